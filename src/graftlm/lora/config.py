"""LoRA settings (Hu et al., 2021), read from and written as PEFT's `adapter_config.json`."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import re2

from graftlm.errors import GraftlmError
from graftlm.model.modules import PROJECTIONS
from graftlm.setting import setting

TARGETS = PROJECTIONS  # an adapter may target any projection
# rank_pattern and alpha_pattern keys are regexes from the adapter's own file: they are matched with RE2,
# which runs in linear time (Python's `re` can backtrack for minutes on a crafted pattern, holding the GIL)
MAX_PATTERNS = 1024
MAX_PATTERN_CHARS = 512
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is our error message, not a line on stderr


class AdapterError(GraftlmError):
    """A malformed adapter, or one that does not fit the base model.

    `public` is the reason in words safe to show a remote client: no path, file contents or config
    value (the server shows it, or a generic reason, never the full message).
    """

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public


def names(text: str) -> tuple[str, ...]:
    """Projection names from "q_proj,v_proj" (a command-line option)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def layer_list(text: str) -> tuple[int, ...]:
    """Layer indices from "0-11,20" (a command-line option)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise AdapterError(f"layers are numbers and ranges such as 0-11,20, not {text!r}") from None
    return tuple(out)


@dataclass(frozen=True)
class LoraConfig:
    r: int = setting(16, "LoRA rank", flag="--rank")
    alpha: float = 32.0  # the command line's default is 2 x rank
    dropout: float = setting(0.0, "LoRA dropout")
    targets: tuple[str, ...] = setting(TARGETS, "comma-separated projections", parse=names)
    layers: tuple[int, ...] | None = setting(None, "layers to adapt, e.g. 0-11,20 (default: all)", parse=layer_list)
    use_rslora: bool = setting(False, "scale by alpha/sqrt(rank) (rsLoRA, Kalajdzievski, 2023)", flag="--rslora")
    use_dora: bool = setting(False, "weight-decomposed LoRA (DoRA, Liu et al., 2024)", flag="--dora")
    # PEFT's per-module overrides: pattern -> rank / alpha, matched against the module path
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise AdapterError(f"LoRA rank must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise AdapterError(f"unknown LoRA target(s) {unknown or '(none)'}; choose from {', '.join(TARGETS)}")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise AdapterError(f"layer indices must be >= 0, got {self.layers}")
        if not math.isfinite(self.alpha):
            raise AdapterError("lora_alpha must be a finite number")
        for what, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            _check_patterns(what, patterns)

    def targets_module(self, layer: int, target: str) -> bool:
        return target in self.targets and (self.layers is None or layer in self.layers)

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """The rank and alpha of the module at `path` (e.g. `model.layers.3.self_attn.q_proj`)."""
        return _pattern(self.rank_pattern, path, self.r), _pattern(self.alpha_pattern, path, self.alpha)

    def scale(self, path: str) -> float:
        r, alpha = self.rank_alpha(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- PEFT's adapter_config.json ------------------------------------------------------------
    def to_peft(self, base_model: str = "") -> dict[str, Any]:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.targets),
            "layers_to_transform": list(self.layers) if self.layers is not None else None,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
        }

    @classmethod
    def from_peft(cls, d: dict[str, Any]) -> LoraConfig:
        if d.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"adapter type {d.get('peft_type')!r} is not supported (only LORA)")
        for key, ok in (("bias", "none"), ("fan_in_fan_out", False)):
            if d.get(key, ok) != ok:
                raise AdapterError(f"adapter setting {key}={d[key]!r} is not supported")
        if d.get("modules_to_save"):
            raise AdapterError(f"adapters with modules_to_save ({d['modules_to_save']}) are not supported")
        targets = d.get("target_modules") or []
        if isinstance(targets, str):  # a PEFT regex: take the projections it names (the weights decide the rest)
            targets = [t for t in TARGETS if t in targets]
        layers = d.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        return cls(
            r=int(d.get("r", 8)),
            alpha=float(d.get("lora_alpha", 8)),
            dropout=float(d.get("lora_dropout", 0.0)),
            targets=tuple(t for t in TARGETS if t in targets),
            layers=tuple(layers) if layers is not None else None,
            use_rslora=bool(d.get("use_rslora", False)),
            use_dora=bool(d.get("use_dora", False)),
            rank_pattern=dict(d.get("rank_pattern") or {}),
            alpha_pattern=dict(d.get("alpha_pattern") or {}),
        )


def _check_patterns(what: str, patterns: dict[str, Any]) -> None:
    if len(patterns) > MAX_PATTERNS:
        raise AdapterError(f"{what} has {len(patterns)} entries; at most {MAX_PATTERNS} are accepted")
    for key, value in patterns.items():
        if not isinstance(key, str) or len(key) > MAX_PATTERN_CHARS:
            raise AdapterError(f"{what} keys must be strings of at most {MAX_PATTERN_CHARS} characters")
        _compiled(key)
        if what == "rank_pattern":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdapterError("every rank_pattern value must be an integer rank >= 1")
        elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise AdapterError("every alpha_pattern value must be a finite number")


@functools.lru_cache(maxsize=4096)
def _compiled(key: str) -> Any:
    try:
        return re2.compile(rf"(.*\.)?({key})$", _RE2_OPTIONS)
    except re2.error:
        raise AdapterError(
            "an adapter pattern (rank_pattern or alpha_pattern key) is not a regular expression RE2 accepts "
            "(no backreferences or lookarounds)"
        ) from None


def _pattern(patterns: dict[str, Any], path: str, default: Any) -> Any:
    # PEFT's get_pattern_key: the first key that matches the end of the module path
    for key, value in patterns.items():
        if _compiled(key).match(path):
            return value
    return default
