"""Where a Llama's projections are, by layer and name, and putting another module in one's place: the
helpers every package that plugs layers into the model (LoRA, palettization) shares."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from graftlm.model.llama import Llama

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def module_path(layer: int, target: str) -> str:
    """The projection's path under Hugging Face naming, e.g. `model.layers.3.self_attn.q_proj`."""
    block = "self_attn" if target in ATTENTION else "mlp"
    return f"model.layers.{layer}.{block}.{target}"


def parent(model: Llama, layer: int, target: str) -> nn.Module:
    """The attention or MLP block that holds projection `target` of `layer`."""
    block = model.layers[layer]
    return block.self_attn if target in ATTENTION else block.mlp


def projections(model: Llama) -> Iterator[tuple[int, str, nn.Module]]:
    """(layer, name, module) of every projection, layer by layer."""
    for i in range(model.config.num_hidden_layers):
        for t in PROJECTIONS:
            yield i, t, getattr(parent(model, i, t), t)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule at path `name` (e.g. `layers.0.mlp.up_proj`) is."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
