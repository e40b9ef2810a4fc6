"""Palettize a model: k-means tables for every weight at every allowed width, a mixed-bit plan to the
target average, and the chosen palettes swapped into the model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from graftlm.errors import GraftlmError
from graftlm.model.llama import Llama
from graftlm.quant.model import apply_palettes, dense_weights, is_palettized
from graftlm.quant.pack import BITS
from graftlm.quant.palette import Palette
from graftlm.quant.plan import Option, Plan, allocate
from graftlm.quant.sensitivity import CalibrationError, Sensitivity

log = logging.getLogger(__name__)

WEIGHTINGS = ("activation", "fisher", "none")


class PalettizeError(GraftlmError):
    """A palettization that cannot be done as asked."""


@dataclass(frozen=True)
class PalettizeConfig:
    bits: float = 3.5  # target average bits per weight, everything counted
    choices: tuple[int, ...] = BITS  # widths a weight may get
    group_size: int = 16  # output rows per table (0: one table per tensor)
    weighting: str = "activation"  # what weights k-means: activation | fisher | none (activation measured best)
    row_scale: bool = True  # a float16 scale per output row (see `Palette`)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise PalettizeError(f"the target must be between 2 and 8 bits per weight, not {self.bits}")
        bad = [b for b in self.choices if b not in BITS]
        if bad or not self.choices:
            raise PalettizeError(f"bit widths must be among {', '.join(map(str, BITS))}, got {list(self.choices)}")
        if self.group_size < 0:
            raise PalettizeError(f"group size must be 0 (one table per tensor) or positive, not {self.group_size}")
        if self.weighting not in WEIGHTINGS:
            raise PalettizeError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {self.weighting!r}")

    @property
    def needs_calibration(self) -> bool:
        """A choice among widths needs sensitivities, and so does weighted k-means."""
        return len(self.choices) > 1 or self.weighting != "none"


def candidates(model: Llama) -> int:
    """How many weights will be palettized (for progress bars)."""
    return sum(1 for _ in dense_weights(model))


def palettize(
    model: Llama,
    config: PalettizeConfig,
    sensitivity: Sensitivity | None = None,
    on_weight: Callable[[str], None] | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """Palettize `model` in place by a mixed-bit plan; return the plan and its record for the layout file."""
    if is_palettized(model):
        raise PalettizeError("the model is already palettized; palettize the uncompressed model instead")
    if config.needs_calibration and sensitivity is None:
        raise CalibrationError("choosing bit widths or weighting k-means needs calibration text")
    options: dict[str, list[Option]] = {}
    made: dict[tuple[str, int], Palette] = {}
    weights = dict(dense_weights(model))
    for name, w in weights.items():
        w = w.detach().float()
        importance = _importance(name, config.weighting, sensitivity)
        cost = None if sensitivity is None else sensitivity.fisher[name]
        norm = float(w.square().sum())
        options[name] = []
        for bits in config.choices:
            p = Palette.of(w, bits, config.group_size, importance, config.row_scale)
            sq = (p.dense() - w).square()
            err = float((sq * cost).sum()) if cost is not None else float(sq.sum())
            options[name].append(Option(bits, p.storage_bits, err, float(sq.sum()) / max(norm, 1e-30)))
            made[name, bits] = p
        if on_weight is not None:
            on_weight(name)
    shared = {id(w) for w in weights.values()}
    fixed = sum(
        p.numel() * p.element_size() * 8 for p in {id(p): p for p in model.parameters()}.values() if id(p) not in shared
    )
    plan = allocate(options, fixed, model.num_parameters(), config.bits)
    apply_palettes(model, {name: made[name, o.bits] for name, o in plan.choice.items()})
    log.info("palettized %d weights: %.3f bits per weight", len(plan.choice), plan.bits_per_weight)
    record = {
        "bits_per_weight": plan.bits_per_weight,
        "target_bits": config.bits,
        "choices": list(config.choices),
        "group_size": config.group_size,
        "weighting": config.weighting,
        "row_scale": config.row_scale,
        "calibration_tokens": 0 if sensitivity is None else sensitivity.tokens,
        "plan": plan.rows(),
    }
    return plan, record


def _importance(name: str, weighting: str, sensitivity: Sensitivity | None) -> torch.Tensor | None:
    if weighting == "none" or sensitivity is None:
        return None
    return sensitivity.fisher[name] if weighting == "fisher" else sensitivity.activation[name]
