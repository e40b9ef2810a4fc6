"""A base model's fingerprint: sha256 over its weights, so an adapter can name the base it fits."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every base weight (float32 bytes, in name order), ignoring adapter parameters.

    Names are normalised so that wrapping a projection (LoRA's `.base`) does not change the result.
    """
    h = hashlib.sha256()
    seen: set[int] = set()
    named = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if "lora_" in name or name.endswith("magnitude") or id(p) in seen:
            continue
        seen.add(id(p))
        named.append((name.replace(".base.", "."), p))
    for name, p in sorted(named, key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(np.ascontiguousarray(p.detach().to("cpu", torch.float32).numpy()).tobytes())
    return h.hexdigest()
