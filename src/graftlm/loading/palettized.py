"""Palettized checkpoint directories: the usual config, tokenizer and safetensors, plus a layout file.

`model.safetensors` holds each palettized weight as `<module>.packed` (uint8 indices), `<module>.tables`
(float16) and, where it has them, `<module>.scales` and `<module>.in_scales` (float16 row and input-column
scales), and every other tensor as usual. `palettization.json` lists the palettized weights (bits,
group size, shape) and the record of how they were made (plan, bits per weight, source). The loader of
checkpoints (`graftlm.loading.checkpoint`) reads it, so all commands load a palettized model by its path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graftlm.errors import CorruptModelError
from graftlm.model.llama import Llama
from graftlm.model.load_hf import hf_state_dict, save_checkpoint
from graftlm.model.modules import replace_module
from graftlm.model.tokenizer import Tokenizer
from graftlm.quant.linear import PalettizedEmbedding, PalettizedLinear
from graftlm.quant.model import EMBED, palettized_modules

FORMAT = "graftlm-palettized"
VERSION = 1
LAYOUT_FILE = "palettization.json"  # beside the weights: which of them are palettized, and how


@dataclass(frozen=True)
class WeightLayout:
    bits: int
    group_size: int
    shape: tuple[int, int]
    row_scale: bool = False
    in_scale: bool = False


@dataclass(frozen=True)
class Layout:
    weights: dict[str, WeightLayout]  # by module path (`layers.0.self_attn.q_proj`, `embed_tokens`)
    record: dict[str, Any]  # how the weights were made: plan, bits per weight, source model

    def prepare(self, dtype: torch.dtype) -> Callable[[Llama], None]:
        """A function that swaps an empty (meta) model's modules for empty palettized ones."""

        def swap(model: Llama) -> None:
            for name, w in self.weights.items():
                old = model.get_submodule(name)
                bias = getattr(old, "bias", None) is not None
                layer = PalettizedLinear.empty(w.shape, w.bits, w.group_size, w.row_scale, bias, in_scale=w.in_scale)
                if name == EMBED:
                    model.embed_tokens = PalettizedEmbedding(layer, dtype)
                    continue
                replace_module(model, name, layer)

        return swap

    def to_json(self) -> dict[str, Any]:
        weights = {
            k: {
                "bits": w.bits,
                "group_size": w.group_size,
                "shape": list(w.shape),
                "row_scale": w.row_scale,
                "in_scale": w.in_scale,
            }
            for k, w in self.weights.items()
        }
        return {"format": FORMAT, "version": VERSION, "weights": weights, **self.record}


def read_layout(path: Path) -> Layout:
    file = path / LAYOUT_FILE
    try:
        raw = json.loads(file.read_text())
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} layout, version {VERSION}")
        weights = {
            k: WeightLayout(
                int(v["bits"]),
                int(v["group_size"]),
                (int(v["shape"][0]), int(v["shape"][1])),
                bool(v.get("row_scale", False)),
                bool(v.get("in_scale", False)),
            )
            for k, v in raw["weights"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CorruptModelError(f"cannot read {file}: {e}") from e
    record = {k: v for k, v in raw.items() if k not in ("format", "version", "weights")}
    return Layout(weights, record)


def layout_of(model: Llama, record: dict[str, Any]) -> Layout:
    weights = {
        name: WeightLayout(
            layer.bits,
            layer.group_size,
            (layer.out_features, layer.in_features),
            layer.scales is not None,
            layer.in_scales is not None,
        )
        for name, layer in palettized_modules(model)
    }
    return Layout(weights, record)


def save_palettized(path: Path, model: Llama, tokenizer: Tokenizer, record: dict[str, Any]) -> None:
    """Write a palettized model as a checkpoint directory (atomically)."""
    layout = layout_of(model, record)
    if not layout.weights:
        raise ValueError("the model has no palettized weights")
    save_checkpoint(
        path,
        model.config,
        hf_state_dict(model),
        tokenizer,
        extra_files={LAYOUT_FILE: json.dumps(layout.to_json(), indent=2)},
    )
