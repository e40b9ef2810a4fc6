"""`graftlm recover`: train the accuracy-recovery adapter of a compressed model by distillation."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console

from graftlm.cli.progress import bar, written
from graftlm.eval.perplexity import spread, text_chunks
from graftlm.lora.config import LoraConfig
from graftlm.lora.peft_io import Adapter
from graftlm.model.catalog import load
from graftlm.model.llama import Llama
from graftlm.train.distill import RecoveryRecord, as_examples, train_recovery
from graftlm.train.eora import error_init
from graftlm.train.trainer import TrainConfig

log = logging.getLogger(__name__)

# --data pieces used at most: 512 of 256 tokens plus the 128 the teacher writes, two epochs, are about half
# an hour on 2 cores for SmolLM2-135M; a larger corpus is sampled evenly instead of costing hours
DATA_SAMPLES = 512
# sequences whose inputs weigh the compression error for --init error (spread over all training text)
GRAM_SAMPLES = 128


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recover",
        help="train a LoRA adapter that wins back what compression lost",
        description=(
            "Distil the uncompressed --teacher into the compressed --student through a LoRA adapter: the "
            "student learns the teacher's next-token distributions (KL) on text the teacher writes itself, "
            "plus any --data text. Task adapters then start from it: graftlm train -m STUDENT --init-from OUT."
        ),
    )
    p.add_argument("--teacher", required=True, help="the uncompressed model (catalog name, directory or .gguf)")
    p.add_argument("--student", required=True, help="the compressed model directory (graftlm palettize)")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write (e.g. adapters/recovery)")
    p.add_argument("--data", type=Path, action="append", default=[], help="more plain-text training text (repeatable)")
    p.add_argument(
        "--data-samples",
        type=int,
        default=DATA_SAMPLES,
        help=f"at most this many --data pieces of --length tokens, spread evenly over the files "
        f"(default {DATA_SAMPLES})",
    )
    p.add_argument("--samples", type=int, default=128, help="texts the teacher writes (default 128)")
    p.add_argument("--length", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on all seven projections (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init",
        choices=("error", "zero"),
        default="error",
        help="start from the compression error at the adapter's rank, weighted by the student's inputs "
        "(EoRA; default), or from zero as a new LoRA does",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.data_samples < 1:
        raise ValueError(f"--data-samples must be 1 or more, not {args.data_samples}")
    teacher, tok, _ = load(args.teacher)
    student, s_tok, s_source = load(args.student)
    if tok.vocab_size != s_tok.vocab_size:
        raise ValueError(f"{args.teacher} and {args.student} have different vocabularies")
    sequences = written(teacher, tok, args.samples, args.length, args.seed + 10_000, "training")
    examples = as_examples(sequences, "teacher")
    pieces: list[list[int]] = []
    if args.data:
        texts = [f.read_text(encoding="utf-8") for f in args.data]
        found = text_chunks(tok, texts, args.length)
        pieces = spread(found, args.data_samples)
        if len(pieces) < len(found):
            log.info("--data: %d of its %d pieces, spread evenly (--data-samples)", len(pieces), len(found))
        examples += as_examples(pieces, "data")
    lora = LoraConfig(r=args.rank, alpha=2.0 * args.rank)
    init, init_record = None, {"method": "zero"}
    if args.init == "error":
        init, init_record = _error_start(teacher, student, spread(sequences + pieces, GRAM_SAMPLES), lora)
    record = RecoveryRecord(
        teacher={"name": args.teacher, "fingerprint": teacher.fingerprint()},
        student={"name": args.student, "origin": str(s_source.origin)},
        data={
            "self_written": len(sequences),
            "seed": args.seed,
            "files": [str(f) for f in args.data],
            "pieces": len(pieces),
        },
        init=init_record,
    )
    config = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch, max_length=args.length, seed=args.seed)
    pad = tok.pad_id
    result = train_recovery(teacher, student, examples, args.out, lora, config, pad, record, init=init)
    Console(stderr=True).print(
        f"wrote {args.out}: {result.steps} steps on {result.tokens} tokens, final KL {result.train_loss:.4f} per token"
    )
    return 0


def _error_start(
    teacher: Llama, student: Llama, text: list[list[int]], lora: LoraConfig
) -> tuple[Adapter, dict[str, object]]:
    """The adapter that cancels most of the student's compression error on `text`'s inputs, and its record."""
    with bar() as progress:
        task = progress.add_task("measuring the student's inputs", total=len(text))
        tensors, removed = error_init(teacher, student, text, lora, lambda: progress.advance(task))
    log.info("the adapter starts from the compression error at rank %d: %.1f%% of it removed", lora.r, 100 * removed)
    record: dict[str, object] = {"method": "error", "sequences": len(text), "removed": removed}
    return Adapter(lora, tensors, student.fingerprint()), record
