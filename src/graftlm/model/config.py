"""The Llama-family model config, read from a Hugging Face `config.json` dict."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graftlm.errors import CorruptModelError, UnsupportedModelError

# model_type values whose checkpoints are the plain Llama graph (optionally with sliding window off).
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (`rope_scaling` / `rope_parameters` in HF configs)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {self.rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.factor <= 0:
            raise CorruptModelError(f"rope scaling factor must be positive, got {self.factor}")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    head_dim: int = 0  # 0 means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise CorruptModelError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise CorruptModelError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise CorruptModelError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face config dict (transformers 4.x or 5.x layout)."""
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(d.get("architectures") or []) or model_type
            raise UnsupportedModelError(
                f"architecture {archs!r} (model_type {model_type!r}) is not supported; "
                f"graftlm runs Llama-family models (model_type: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
        window = d.get("sliding_window")
        max_pos = int(d.get("max_position_embeddings", 2048))
        if window is not None and window < max_pos:
            raise UnsupportedModelError(
                f"sliding-window attention (window {window} < context {max_pos}) is not supported"
            )
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in d
        ]
        if missing:
            raise CorruptModelError(f"config is missing required fields: {', '.join(missing)}")
        # transformers 5 moves rope_theta and scaling into `rope_parameters`.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            max_position_embeddings=max_pos,
            head_dim=int(d.get("head_dim") or 0),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_ids,
            model_type=model_type,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that transformers' `LlamaForCausalLM` loads."""
        d = asdict(self)
        scaling = d.pop("rope_scaling")
        if scaling["rope_type"] == "default":
            scaling = {"rope_type": "default"}
        elif scaling["rope_type"] == "linear":
            scaling = {"rope_type": "linear", "factor": scaling["factor"]}
        # transformers 5 reads `rope_parameters`; 4.x reads `rope_theta` and `rope_scaling`.
        d["rope_parameters"] = {**scaling, "rope_theta": self.rope_theta}
        d["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
        d["eos_token_id"] = (list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]) or None
        d["hidden_act"] = "silu"
        d["architectures"] = ["LlamaForCausalLM"]
        d["torch_dtype"] = "float32"
        return d

    @classmethod
    def from_file(cls, path: Path) -> LlamaConfig:
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CorruptModelError(f"cannot read model config {path}: {e}") from e
        return cls.from_hf_dict(d)
