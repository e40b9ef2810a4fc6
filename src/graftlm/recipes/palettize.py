"""The compression recipe: calibrate, plan a mix of widths, palettize, tune the tables, write the checkpoint.

`graftlm palettize` parses its options and calls `palettize_checkpoint`; the benchmark calls the same.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graftlm.eval.perplexity import spread, text_chunks
from graftlm.loading.catalog import load
from graftlm.loading.checkpoint import is_palettized
from graftlm.loading.palettized import save_palettized
from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer
from graftlm.progress import progress
from graftlm.quant.palettize import PalettizeConfig, PalettizeError, candidates, palettize
from graftlm.quant.plan import Plan
from graftlm.quant.probe import KLProbe
from graftlm.quant.sensitivity import CalibrationError, measure
from graftlm.recipes.tune import TUNE_BATCH, TUNE_LR, TUNE_SAMPLES, TUNE_STEPS, tune_palettes
from graftlm.setting import setting
from graftlm.train.synthetic import written
from graftlm.train.trainer import TrainConfig

log = logging.getLogger(__name__)

# sequences the plan's KL probe runs on (cost and gain: benchmarks/README.md, "Palettization: ...")
KL_SAMPLES = 4


@dataclass(frozen=True)
class Calibration:
    """The text the plan and the tuning are measured on, and how much of it."""

    files: tuple[Path, ...] = ()  # plain-text files; none: text the model writes itself
    samples: int = setting(
        128,
        "calibration sequences: samples the model writes, or at most this many pieces spread evenly over the "
        "--calib text",
        flag="--calib-samples",
    )
    length: int = setting(256, "tokens per calibration sequence", flag="--calib-length")
    seed: int = setting(0, "seed of the self-written calibration text")
    kl_samples: int = setting(
        KL_SAMPLES,
        "calibration sequences on which each weight's loss at one width is measured end to end (the KL to the "
        "uncompressed model) to scale the plan's estimates (0: estimates alone)",
    )

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise PalettizeError(f"--calib-samples must be 1 or more, not {self.samples}")
        if self.kl_samples < 0:
            raise PalettizeError(f"--kl-samples must be 0 (estimates alone) or more, not {self.kl_samples}")


@dataclass(frozen=True)
class Tuning:
    """Tables and scales trained by KL to imitate the uncompressed model (see `graftlm.recipes.tune`)."""

    steps: int = setting(
        TUNE_STEPS,
        "steps of 8 sequences of the tuning text, KL to the uncompressed model (one pass over the default "
        "text; 0: no tuning)",
        flag="--tune-steps",
    )
    samples: int = setting(
        TUNE_SAMPLES,
        "texts the uncompressed model writes itself, added to the calibration text for tuning (0: the "
        "calibration text alone)",
        flag="--tune-samples",
    )
    lr: float = setting(TUNE_LR, "peak learning rate", flag="--tune-lr")

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise PalettizeError(f"--tune-steps must be 0 (no tuning) or more, not {self.steps}")
        if self.samples < 0:
            raise PalettizeError(f"--tune-samples must be 0 (the calibration text alone) or more, not {self.samples}")


@dataclass
class Palettized:
    """What `palettize_checkpoint` made: the plan, the layout's record, where, and in how long."""

    plan: Plan
    record: dict[str, Any]
    out: Path
    seconds: float


def palettize_checkpoint(
    model_name: str,
    out: Path,
    config: PalettizeConfig | None = None,
    calibration: Calibration | None = None,
    tuning: Tuning | None = None,
    device: str = "cpu",
) -> Palettized:
    """Compress the model `model_name` names to a palettized checkpoint directory at `out` (each setting
    left out takes its defaults). The calibration passes (self-written text, sensitivity) run on `device`;
    the tables are fitted, tuned and written on the CPU."""
    config, calibration, tuning = config or PalettizeConfig(), calibration or Calibration(), tuning or Tuning()
    model, tokenizer, source = load(model_name)
    if is_palettized(source.checkpoint):
        raise PalettizeError(f"{model_name} is already palettized; palettize the uncompressed model instead")
    t0 = time.perf_counter()
    source_fingerprint = model.fingerprint()
    sequences, origin = [], ""
    sensitivity = None
    with _on(model, device):
        if config.needs_calibration or tuning.steps:
            sequences, origin = _calibration_text(model, tokenizer, calibration)
        if config.needs_calibration:
            with progress("measuring sensitivity", len(sequences), "sequences") as p:
                sensitivity = measure(model, sequences, p.advance, gram=config.gptq).cpu()
            log.info("sensitivity measured on %d tokens (%s)", sensitivity.tokens, origin)
    probe = None
    if calibration.kl_samples and len(config.choices) > 1:
        probe = KLProbe(model, spread(sequences, calibration.kl_samples))
        log.info("the plan's estimates are scaled to KLs measured on %d tokens", probe.tokens)
    teacher = copy.deepcopy(model) if tuning.steps else None
    tuning_text: list[list[int]] = []
    if teacher is not None and tuning.samples:
        seed = calibration.seed + 1_000  # not the self-written calibration text again
        tuning_text = written(model, tokenizer, tuning.samples, calibration.length, seed, "tuning")
    with progress("k-means tables", candidates(model), "weights") as p:
        plan, record = palettize(model, config, sensitivity, lambda _: p.advance(), probe)
    del probe
    if teacher is not None:
        record["tuning"] = _tune(model, teacher, sequences, tuning_text, tuning, calibration, tokenizer.pad_id)
        del teacher
    record["source"] = {"model": model_name, "fingerprint": source_fingerprint}
    if sequences:
        record["calibration"] = origin
    save_palettized(out, model, tokenizer, record)
    return Palettized(plan, record, out, time.perf_counter() - t0)


@contextlib.contextmanager
def _on(model: Llama, device: str) -> Iterator[None]:
    """The model on `device` for the block, back on the CPU after it."""
    if torch.device(device).type == "cpu":
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


def _calibration_text(model: Llama, tokenizer: Tokenizer, calibration: Calibration) -> tuple[list[list[int]], str]:
    """The calibration sequences and a line saying where they came from."""
    if calibration.files:
        texts = [f.read_text(encoding="utf-8") for f in calibration.files]
        sequences = spread(text_chunks(tokenizer, texts, calibration.length), calibration.samples)
        origin = f"{len(sequences)} pieces of {', '.join(map(str, calibration.files))}"
    else:
        c = calibration
        sequences = written(model, tokenizer, c.samples, c.length, c.seed, "calibration")
        origin = f"{c.samples} self-written samples, seed {c.seed}"
    if not sequences:
        raise CalibrationError("the calibration text is empty")
    return sequences, origin


def _tune(
    model: Llama,
    teacher: Llama,
    sequences: list[list[int]],
    extra: list[list[int]],
    tuning: Tuning,
    calibration: Calibration,
    pad_id: int,
) -> dict[str, Any]:
    train = TrainConfig(lr=tuning.lr, batch_size=TUNE_BATCH, max_length=calibration.length, seed=calibration.seed)
    result = tune_palettes(model, teacher, sequences + extra, train, tuning.steps, pad_id)
    return {
        "steps": result.steps,
        "lr": tuning.lr,
        "sequences": {"calibration": len(sequences), "self-written": len(extra)},
        "final_kl": result.train_loss,
    }
