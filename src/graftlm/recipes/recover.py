"""The recovery recipe: distil the uncompressed teacher into the compressed student through a LoRA adapter
(the accuracy-recovery adapter task adapters then start from).

`graftlm recover` parses its options and calls `train_recovery_adapter`; the benchmark calls the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from graftlm.errors import GraftlmError
from graftlm.eval.perplexity import spread, text_chunks
from graftlm.loading.catalog import Placement
from graftlm.lora.config import LoraConfig
from graftlm.lora.peft_io import Adapter
from graftlm.model.llama import Llama
from graftlm.progress import progress
from graftlm.setting import setting
from graftlm.train.distill import RecoveryRecord, as_examples, train_recovery
from graftlm.train.eora import error_init
from graftlm.train.synthetic import written
from graftlm.train.trainer import TrainConfig, TrainResult

log = logging.getLogger(__name__)

# --data pieces used at most: a larger corpus is sampled evenly instead of costing hours
# (benchmarks/README.md, "Recovery data")
DATA_SAMPLES = 512
# sequences whose inputs weigh the compression error for --init error (spread over all training text)
GRAM_SAMPLES = 128


@dataclass(frozen=True)
class RecoverConfig:
    data: tuple[Path, ...] = ()  # more plain-text training text
    data_samples: int = setting(
        DATA_SAMPLES, "at most this many --data pieces of --length tokens, spread evenly over the files"
    )
    samples: int = setting(128, "texts the teacher writes")
    length: int = setting(256, "tokens per sequence")
    rank: int = setting(16, "LoRA rank on all seven projections")
    lr: float = setting(1e-3, "peak learning rate")
    epochs: int = setting(2, "passes over the training text")
    batch: int = setting(8, "sequences per step")
    seed: int = setting(0, "seed of the teacher's text and of training")
    init: str = setting(
        "error",
        "start from the compression error at the adapter's rank, weighted by the student's inputs (EoRA), or "
        "from zero as a new LoRA does",
        choices=("error", "zero"),
    )

    def __post_init__(self) -> None:
        if self.data_samples < 1:
            raise GraftlmError(f"--data-samples must be 1 or more, not {self.data_samples}")
        if self.init not in ("error", "zero"):
            raise GraftlmError(f"--init is error or zero, not {self.init!r}")


def train_recovery_adapter(
    teacher_name: str, student_name: str, out: Path, config: RecoverConfig, place: Placement = Placement()
) -> TrainResult:
    """Train the recovery adapter of the compressed `student_name` and write it to `out`."""
    teacher, tok, _ = place.load(teacher_name)
    student, s_tok, s_source = place.load(student_name)
    if tok.vocab_size != s_tok.vocab_size:
        raise GraftlmError(f"{teacher_name} and {student_name} have different vocabularies")
    sequences = written(teacher, tok, config.samples, config.length, config.seed + 10_000, "training")
    examples = as_examples(sequences, "teacher")
    pieces: list[list[int]] = []
    if config.data:
        texts = [f.read_text(encoding="utf-8") for f in config.data]
        found = text_chunks(tok, texts, config.length)
        pieces = spread(found, config.data_samples)
        if len(pieces) < len(found):
            log.info("--data: %d of its %d pieces, spread evenly (--data-samples)", len(pieces), len(found))
        examples += as_examples(pieces, "data")
    lora = LoraConfig(r=config.rank, alpha=2.0 * config.rank)
    init, init_record = None, {"method": "zero"}
    if config.init == "error":
        init, init_record = _error_start(teacher, student, spread(sequences + pieces, GRAM_SAMPLES), lora)
    record = RecoveryRecord(
        teacher={"name": teacher_name, "fingerprint": teacher.fingerprint()},
        student={"name": student_name, "origin": str(s_source.origin)},
        data={
            "self_written": len(sequences),
            "seed": config.seed,
            "files": [str(f) for f in config.data],
            "pieces": len(pieces),
        },
        init=init_record,
    )
    c = config
    train = TrainConfig(lr=c.lr, epochs=c.epochs, batch_size=c.batch, max_length=c.length, seed=c.seed)
    return train_recovery(teacher, student, examples, out, lora, train, tok.pad_id, record, init=init)


def _error_start(
    teacher: Llama, student: Llama, text: list[list[int]], lora: LoraConfig
) -> tuple[Adapter, dict[str, object]]:
    """The adapter that cancels most of the student's compression error on `text`'s inputs, and its record."""
    with progress("measuring the student's inputs", len(text), "sequences") as p:
        tensors, removed = error_init(teacher, student, text, lora, p.advance)
    log.info("the adapter starts from the compression error at rank %d: %.1f%% of it removed", lora.r, 100 * removed)
    record: dict[str, object] = {"method": "error", "sequences": len(text), "removed": removed}
    return Adapter(lora, tensors, student.fingerprint()), record
