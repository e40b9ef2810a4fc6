"""Palettize a model: k-means tables for every weight at every allowed width, a mixed-bit plan to the
target average, and the chosen palettes swapped into the model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from graftlm.errors import GraftlmError
from graftlm.model.llama import Llama
from graftlm.quant.gptq import refine
from graftlm.quant.model import EMBED, HEAD, apply_palettes, dense_weights, is_palettized
from graftlm.quant.pack import BITS
from graftlm.quant.palette import Palette
from graftlm.quant.plan import Option, Plan, allocate
from graftlm.quant.probe import KLProbe
from graftlm.quant.sensitivity import CalibrationError, Sensitivity
from graftlm.setting import setting

log = logging.getLogger(__name__)

WEIGHTINGS = ("activation", "fisher", "none")
# activation-aware input scales tried besides none: s_j = E[x_j²]^(−α/2); each weight keeps whichever gives
# the least estimated loss (why these α: benchmarks/README.md, "Palettization: input scales, ...")
ALPHAS = (0.25, 0.5)
# The output head gets a floor in mixed plans: its estimated loss is measured on calibration text the model
# wrote itself, where it is confident, and understates its loss on real text (as llama.cpp's K-quant mixes
# keep the output tensor wide; figures: benchmarks/README.md, "Palettization: ...")
HEAD_FLOOR = 4


class PalettizeError(GraftlmError):
    """A palettization that cannot be done as asked."""


def widths(text: str) -> tuple[int, ...]:
    """Bit widths from "2,3,4" (a command-line option)."""
    try:
        return tuple(sorted({int(c) for c in text.split(",") if c.strip()}))
    except ValueError:
        raise PalettizeError(f"bit widths are integers separated by commas, not {text!r}") from None


@dataclass(frozen=True)
class PalettizeConfig:
    bits: float = setting(3.5, "target average bits per weight, 2-8, everything counted")
    choices: tuple[int, ...] = setting(
        BITS, "bit widths a weight may get, comma-separated (one width gives a uniform model)", parse=widths
    )
    group_size: int = setting(16, "output rows per table (0: one table per tensor)")
    weighting: str = setting("activation", "what weights k-means (activation measured best)", choices=WEIGHTINGS)
    row_scale: bool = setting(
        True, "no float16 scale per output row (rows of a group then share one table as they are)"
    )  # see `Palette`
    gptq: bool = setting(
        True, "round each weight to its nearest table entry instead of GPTQ's error-compensating assignment"
    )
    in_scale: bool = setting(
        True, "no float16 input-column scales (otherwise tried per weight and kept where they lower the loss)"
    )
    head_bits: int = setting(
        HEAD_FLOOR,
        "the least width the output head (a tied embedding) gets in a mixed plan; its loss on the model's own "
        "calibration text understates its loss on real text (0: no floor)",
    )

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise PalettizeError(f"the target must be between 2 and 8 bits per weight, not {self.bits}")
        bad = [b for b in self.choices if b not in BITS]
        if bad or not self.choices:
            raise PalettizeError(f"bit widths must be among {', '.join(map(str, BITS))}, got {list(self.choices)}")
        if self.group_size < 0:
            raise PalettizeError(f"group size must be 0 (one table per tensor) or positive, not {self.group_size}")
        if self.head_bits and len(self.choices) > 1 and max(self.choices) < self.head_bits:
            raise PalettizeError(
                f"the output head needs at least {self.head_bits} bits but the widest choice is {max(self.choices)}"
            )
        if self.weighting not in WEIGHTINGS:
            raise PalettizeError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {self.weighting!r}")

    @property
    def needs_calibration(self) -> bool:
        """A choice among widths needs sensitivities, and so does weighted k-means."""
        return len(self.choices) > 1 or self.weighting != "none" or self.gptq


def candidates(model: Llama) -> int:
    """How many weights will be palettized (for progress bars)."""
    return sum(1 for _ in dense_weights(model))


def palettize(
    model: Llama,
    config: PalettizeConfig,
    sensitivity: Sensitivity | None = None,
    on_weight: Callable[[str], None] | None = None,
    probe: KLProbe | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """Palettize `model` in place by a mixed-bit plan; return the plan and its record for the layout file.
    With a `probe` (of this model) each weight's estimated losses are scaled to one measured KL (`_calibrate`)."""
    if is_palettized(model):
        raise PalettizeError("the model is already palettized; palettize the uncompressed model instead")
    if config.needs_calibration and sensitivity is None:
        raise CalibrationError("choosing bit widths, weighting k-means or GPTQ needs calibration text")
    if config.gptq and sensitivity is not None and not sensitivity.gram:
        raise CalibrationError("GPTQ needs the input Gram matrices: measure the sensitivity with gram=True")
    options: dict[str, list[Option]] = {}
    made: dict[tuple[str, int], Palette] = {}
    measured: dict[str, tuple[int, float]] = {}  # by weight: (width, its KL) where the probe measured it
    weights = dict(dense_weights(model))
    head = EMBED if model.config.tie_word_embeddings else HEAD
    for name, w in weights.items():
        w = w.detach().float()
        widths = config.choices
        if name == head and len(widths) > 1:
            widths = tuple(b for b in widths if b >= config.head_bits)
        importance = _importance(name, config.weighting, sensitivity)
        gram = sensitivity.gram.get(name) if sensitivity is not None and config.gptq else None
        norm = float(w.square().sum())
        scale_choices = _in_scale_choices(name, w, config, sensitivity)  # the same at every width
        options[name] = []
        for bits in widths:
            cost, p, q = min(
                (_candidate(name, w, bits, s, config, importance, gram, sensitivity) for s in scale_choices),
                key=lambda c: c[0],
            )
            sq = float((q - w).square().sum())
            options[name].append(Option(bits, p.storage_bits, cost, sq / max(norm, 1e-30)))
            made[name, bits] = p
        if probe is not None and len(config.choices) > 1:
            ref = min(widths, key=lambda b: (abs(b - config.bits), b))
            measured[name] = ref, probe.kl(name, made[name, ref].dense())
        if on_weight is not None:
            on_weight(name)
    shared = {id(w) for w in weights.values()}
    fixed = sum(
        p.numel() * p.element_size() * 8 for p in {id(p): p for p in model.parameters()}.values() if id(p) not in shared
    )
    if measured:
        options = _calibrate(options, measured)
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
        "gptq": config.gptq,
        "in_scale": config.in_scale,
        "head_bits": config.head_bits,
        "calibration_tokens": 0 if sensitivity is None else sensitivity.tokens,
        "plan": plan.rows(),
    }
    if measured and probe is not None:
        record["measured_kl"] = {
            "tokens": probe.tokens,
            "kl": {n: {"bits": b, "kl": v} for n, (b, v) in measured.items()},
        }
    return plan, record


def _calibrate(options: dict[str, list[Option]], measured: dict[str, tuple[int, float]]) -> dict[str, list[Option]]:
    """Each weight's estimated losses scaled so that the width the probe measured has its measured KL
    (see `probe.py`); the plan then compares KLs. A weight whose ratio cannot be formed (an estimate or a
    KL of zero) takes the median ratio of the others, so all stay in one unit."""
    ratios: dict[str, float] = {}
    for name, (bits, kl) in measured.items():
        est = next(o.error for o in options[name] if o.bits == bits)
        if est > 0 and kl > 0:
            ratios[name] = kl / est
    fallback = float(torch.tensor(list(ratios.values())).median()) if ratios else 1.0
    return {
        name: [replace(o, error=o.error * ratios.get(name, fallback)) for o in opts] for name, opts in options.items()
    }


def _candidate(
    name: str,
    w: torch.Tensor,
    bits: int,
    in_scales: torch.Tensor | None,
    config: PalettizeConfig,
    importance: torch.Tensor | None,
    gram: torch.Tensor | None,
    sensitivity: Sensitivity | None,
) -> tuple[float, Palette, torch.Tensor]:
    """One way to palettize W at `bits`: (its estimated loss, the palette, its dequantized weight)."""
    p = Palette.of(w, bits, config.group_size, importance, config.row_scale, in_scales)
    if gram is not None:
        p = refine(p, w, gram)
    q = p.dense()
    return _loss_cost(name, q, w, sensitivity, gram), p, q


def _loss_cost(
    name: str, q: torch.Tensor, w: torch.Tensor, sensitivity: Sensitivity | None, gram: torch.Tensor | None
) -> float:
    """The loss a quantization Q of W adds, to compare tensors in the plan. With the Fisher diagonal F,
    Σ F·(W − Q)²; with the input Gram matrix H as well, Σ_i g_i·(d_i H d_iᵀ), where d = Q − W and g_i, the
    output row's gradient second moment, is Σ_j F_ij / Σ_j H_jj (F_ij ≈ g_i·H_jj when gradients and inputs
    are independent), so correlated inputs that GPTQ exploits are counted."""
    d = q - w
    if sensitivity is None:
        return float(d.square().sum())
    fisher = sensitivity.fisher[name]
    if gram is None:
        return float((d.square() * fisher).sum())
    g = fisher.sum(1) / torch.diagonal(gram).sum().clamp_min(1e-30)  # [out]
    return float((((d @ gram.float()) * d).sum(1) * g).sum())


def _in_scale_choices(
    name: str, w: torch.Tensor, config: PalettizeConfig, sensitivity: Sensitivity | None
) -> list[torch.Tensor | None]:
    """The input-column scales to try for a weight: none, and where allowed, for the embedding the spread
    of each hidden dimension (its rows are tokens, its columns dimensions of very different range), for a
    projection its inputs' activation statistics to the powers in `ALPHAS`."""
    if not config.in_scale:
        return [None]
    if name == EMBED:
        return [None, _geometric_unit(w.std(0))]
    if sensitivity is None:
        return [None]
    act = sensitivity.activation[name].float()
    act = act.clamp_min(float(act.max()) * 1e-6 + 1e-30)  # inputs that never fire take the smallest scale
    return [None, *(_geometric_unit(act ** (-a / 2)) for a in ALPHAS)]


def _geometric_unit(s: torch.Tensor) -> torch.Tensor:
    """Positive scales divided by their geometric mean and kept within float16's comfortable range."""
    s = s.float().clamp_min(1e-12)
    return (s / s.log().mean().exp()).clamp(1e-3, 1e3)


def _importance(name: str, weighting: str, sensitivity: Sensitivity | None) -> torch.Tensor | None:
    if weighting == "none" or sensitivity is None:
        return None
    return sensitivity.fisher[name] if weighting == "fisher" else sensitivity.activation[name]
