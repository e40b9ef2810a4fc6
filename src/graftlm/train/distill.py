"""Accuracy recovery: a LoRA adapter that makes a compressed model imitate the uncompressed one.

The student (the palettized model plus a LoRA adapter) learns the teacher's whole next-token
distribution, KL(teacher ‖ student) at every position, on text the teacher writes itself (see
`graftlm.train.synthetic`) and optionally on text the user gives: no labelled dataset is needed, and
the adapter learns what compression took away rather than a task. Task adapters then start from it
(`graftlm train --init-from`), as Apple's do.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from graftlm import __version__
from graftlm.errors import ConfigError
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import lora_state_dict
from graftlm.lora.peft_io import Adapter, save_adapter
from graftlm.model.llama import Llama
from graftlm.train.data import Batch, Example
from graftlm.train.losses import CHUNK_ROWS, ChunkedLinearKL, frozen_head
from graftlm.train.trainer import TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)


def kl_loss(teacher: Llama) -> Callable[[Llama, Batch], tuple[torch.Tensor, int]]:
    """Σ over target positions of KL(teacher ‖ student) between next-token distributions.

    With a frozen output head (a LoRA adapter, or palette tuning) the student's side goes through
    `ChunkedLinearKL`: distributions a chunk of rows at a time, the gradient made at once.
    """

    def loss(student: Llama, batch: Batch) -> tuple[torch.Tensor, int]:
        pick = batch.targets[:, 1:]  # token s+1 is predicted from position s
        hs = student.hidden(batch.tokens)[:, :-1][pick]  # [N, hidden]
        with torch.no_grad():
            ht = teacher.hidden(batch.tokens)[:, :-1][pick]

        def teacher_logits(i: int, j: int) -> torch.Tensor:
            with torch.no_grad():
                return teacher.logits(ht[i:j])

        n = int(pick.sum())
        head = frozen_head(student)
        if head is not None:
            return ChunkedLinearKL.apply(student.norm(hs), head, teacher_logits), n
        total = torch.zeros((), device=hs.device)
        for i in range(0, hs.shape[0], CHUNK_ROWS):
            t_logp = F.log_softmax(teacher_logits(i, i + CHUNK_ROWS), dim=-1)  # [rows, V]
            s_logp = F.log_softmax(student.logits(hs[i : i + CHUNK_ROWS]), dim=-1)
            total = total + F.kl_div(s_logp, t_logp, log_target=True, reduction="sum")
        return total, n

    return loss


def as_examples(sequences: Sequence[Sequence[int]], origin: str) -> list[Example]:
    """Every token after the first is a target."""
    return [
        Example(tuple(s), (False,) + (True,) * (len(s) - 1), f"{origin}:{i}")
        for i, s in enumerate(sequences)
        if len(s) > 1
    ]


@dataclass(frozen=True)
class RecoveryRecord:
    teacher: dict[str, str]
    student: dict[str, str]
    data: dict[str, object]
    init: dict[str, object]  # what the adapter started from


def train_recovery(
    teacher: Llama,
    student: Llama,
    examples: list[Example],
    out: Path,
    lora: LoraConfig,
    config: TrainConfig,
    pad_id: int,
    record: RecoveryRecord,
    storage_dtype: str = "bfloat16",
    init: Adapter | None = None,
) -> TrainResult:
    """Train the recovery adapter on `student` against `teacher` and write it (PEFT format) to `out`;
    `init`: the weights it starts from (`eora.error_init`) instead of LoRA's B = 0."""
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ConfigError("teacher and student must share a vocabulary")
    fingerprint = student.fingerprint()
    for p in teacher.parameters():
        p.requires_grad_(False)
    trainer = Trainer(student, lora, config, pad_id, init=init, loss=kl_loss(teacher))
    result = trainer.run(examples)
    meta = {
        "graftlm_version": __version__,
        "kind": "accuracy-recovery",
        "base_model": {**record.student, "fingerprint": fingerprint},
        "teacher": record.teacher,
        "data": record.data,
        "init": record.init,
        "config": trainer.config_record(),
        "metrics": {
            "steps": result.steps,
            "train_kl": result.train_loss,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 2),
        },
        "history": result.history,
    }
    save_adapter(
        out,
        lora,
        lora_state_dict(student),
        fingerprint,
        storage_dtype,
        base_model=record.student.get("name", ""),
        extra_files={"training.json": json.dumps(meta, indent=2)},
    )
    log.info("wrote %s: %d steps, final KL %.4f per token", out, result.steps, result.train_loss)
    return result
