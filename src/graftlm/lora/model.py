"""Put LoRA layers into a model, read their weights out under PEFT's names, and merge them away."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from graftlm.lora.config import AdapterError, LoraConfig
from graftlm.lora.layer import LoRALinear
from graftlm.model.llama import Llama
from graftlm.model.modules import module_path, parent, projections

PEFT_PREFIX = "base_model.model."


def add_lora(model: Llama, config: LoraConfig, only: set[str] | None = None) -> list[str]:
    """Wrap every targeted projection (or just the module paths in `only`) in a trainable `LoRALinear`;
    freeze everything else."""
    n_layers = model.config.num_hidden_layers
    if config.layers is not None and max(config.layers, default=0) >= n_layers:
        raise AdapterError(f"LoRA layers {config.layers} do not exist: the model has {n_layers} layers")
    model.fingerprint()  # of the base weights, before anything changes
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for i, t, proj in projections(model):
        chosen = module_path(i, t) in only if only is not None else config.targets_module(i, t)
        if not chosen:
            continue
        if isinstance(proj, LoRALinear):
            raise AdapterError(f"{module_path(i, t)} already has a LoRA adapter")
        path = module_path(i, t)
        r, _ = config.rank_alpha(path)
        layer = LoRALinear.from_base(proj, r, config.scale(path), config.dropout, config.use_dora)
        setattr(parent(model, i, t), t, layer)
        wrapped.append(path)
    return wrapped


def lora_layers(model: Llama) -> Iterator[tuple[str, LoRALinear]]:
    for i, t, proj in projections(model):
        if isinstance(proj, LoRALinear):
            yield module_path(i, t), proj


def lora_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names, float32."""
    out = {}
    for path, layer in lora_layers(model):
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A.detach()
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B.detach()
        if layer.magnitude is not None:
            out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = layer.magnitude.detach()
    return out


def load_lora_state(model: Llama, tensors: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-named tensors into the model's LoRA layers (shapes checked by `peft_io.check_fits`)."""
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for key, value in tensors.items():
            path, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            layer = layers.get(path)
            if layer is None:
                raise AdapterError(f"adapter tensor {key!r} has no LoRA layer in this model")
            param = {"A.weight": layer.lora_A, "B.weight": layer.lora_B, "magnitude_vector": layer.magnitude}.get(kind)
            if param is None:
                raise AdapterError(f"adapter tensor {key!r} is not a LoRA weight")
            param.copy_(value.to(param.dtype))


def merge_lora(model: Llama) -> Llama:
    """Replace every LoRA layer with a plain linear holding W + s·BA (the model is changed in place)."""
    for i, t, proj in projections(model):
        if isinstance(proj, LoRALinear):
            setattr(parent(model, i, t), t, proj.merge())
    model._fingerprint = None
    return model
