"""Which weights of a Llama model are palettized, and swapping their modules for palettized ones."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from graftlm.model.llama import Llama
from graftlm.model.modules import module_path, projections, replace_module
from graftlm.quant.linear import PalettizedEmbedding, PalettizedLinear
from graftlm.quant.palette import Palette

EMBED, HEAD = "embed_tokens", "lm_head"


def weight_names(model: Llama) -> list[str]:
    """The palettizable weights, by module path: every projection, the embedding, an untied head."""
    names = [module_path(i, t).removeprefix("model.") for i, t, _ in projections(model)] + [EMBED]
    return names if model.config.tie_word_embeddings else [*names, HEAD]


def dense_weights(model: Llama) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, [out, in] weight) of every palettizable weight of an unpalettized model."""
    for name in weight_names(model):
        module = model.get_submodule(name)
        if isinstance(module, (PalettizedLinear, PalettizedEmbedding)):
            raise ValueError(f"{name} is already palettized")
        yield name, module.weight


def is_palettized(model: Llama) -> bool:
    return any(isinstance(m, PalettizedLinear) for m in model.modules())


def apply_palettes(model: Llama, palettes: dict[str, Palette]) -> Llama:
    """Replace each named weight's module by its palettized twin (in place); a tied head shares the
    embedding's indices and tables."""
    for name, palette in palettes.items():
        if name == EMBED:
            layer = PalettizedLinear(palette)
            model.embed_tokens = PalettizedEmbedding(layer, model.dtype)
            if model.config.tie_word_embeddings:
                model.lm_head = layer
            continue
        old = model.get_submodule(name)
        replace_module(model, name, PalettizedLinear(palette, None if old.bias is None else old.bias.detach()))
    model._fingerprint = None
    return model


def palettized_modules(model: Llama) -> Iterator[tuple[str, PalettizedLinear]]:
    """(name, layer) for every palettized weight, the shared embedding/head once, under `EMBED`."""
    for name in weight_names(model):
        module = model.get_submodule(name)
        if isinstance(module, PalettizedEmbedding):
            yield name, module.lut
        elif isinstance(module, PalettizedLinear):
            yield name, module
