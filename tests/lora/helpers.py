"""Random adapters for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import add_lora, lora_layers, lora_state_dict
from graftlm.lora.peft_io import Adapter

# Eight adapters that differ in rank, targets, layers, scaling and DoRA.
EIGHT = [
    LoraConfig(r=16, alpha=32),
    LoraConfig(r=8, alpha=16, targets=("q_proj", "v_proj")),
    LoraConfig(r=4, alpha=4, targets=("gate_proj", "up_proj", "down_proj")),
    LoraConfig(r=2, alpha=8, layers=(0,)),
    LoraConfig(r=12, alpha=6, use_rslora=True, targets=("k_proj", "o_proj", "down_proj")),
    LoraConfig(r=8, alpha=16, use_dora=True),
    LoraConfig(r=1, alpha=2, targets=("o_proj",)),
    LoraConfig(r=16, alpha=16, use_dora=True, targets=("q_proj", "up_proj"), layers=(1,)),
]


def random_adapter(ckpt: Path, config: LoraConfig, seed: int, name: str | None = None) -> Adapter:
    model, _ = load_checkpoint(ckpt)
    add_lora(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.normal_(0, 0.2, generator=g)
            layer.lora_B.normal_(0, 0.2, generator=g)
            if layer.magnitude is not None:
                layer.magnitude.mul_(torch.rand(layer.magnitude.shape, generator=g) + 0.5)
    tensors = {k: v.clone() for k, v in lora_state_dict(model).items()}
    return Adapter(config, tensors, model.fingerprint(), Path(name or f"adapter{seed}"))
