"""A base model's fingerprint: sha256 over its weights, so an adapter can name the base it fits."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import torch
from torch import nn


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every base weight (float32 bytes, in name order), ignoring adapter parameters.

    Palettized weights count by their packed indices, tables, row and input scales (their buffers). Names
    are normalised so that wrapping a projection (LoRA's `.base`) does not change the result.
    """
    h = hashlib.sha256()
    seen: set[int] = set()
    named = []
    buffers = model.named_buffers(remove_duplicate=False)
    palettes = (kv for kv in buffers if kv[0].endswith((".packed", ".tables", ".scales", ".in_scales")))
    for name, p in itertools.chain(model.named_parameters(remove_duplicate=False), palettes):
        if "lora_" in name or name.endswith("magnitude") or id(p) in seen:
            continue
        seen.add(id(p))
        named.append((name.replace(".base.", "."), p))
    for name, p in sorted(named, key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        t = p.detach().to("cpu", torch.float32 if p.is_floating_point() else p.dtype)
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()
