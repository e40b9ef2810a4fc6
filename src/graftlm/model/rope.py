"""Rotary position embeddings (Su et al., 2021, RoFormer), with linear and Llama 3 frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import torch

from graftlm.model.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim // 2], after the config's scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    s = config.rope_scaling
    if s.rope_type == "linear":
        inv_freq = inv_freq / s.factor
    elif s.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(mid, blended, inv_freq)
    return inv_freq.float()


class RotaryTable:
    """Precomputed cos/sin for every position up to the context length, gathered by position id."""

    def __init__(self, config: LlamaConfig, device: torch.device | str = "cpu"):
        inv_freq = inverse_frequencies(config)
        pos = torch.arange(config.max_position_embeddings, dtype=torch.float32, device="cpu")
        freqs = torch.outer(pos, inv_freq)  # [T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, D]
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def to(self, device: torch.device | str) -> RotaryTable:
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [B, S] -> cos, sin: [B, 1, S, D] (broadcast over heads)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, or its transpose (the rotation by -θ), rounded as HF's form is."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    sin1, sin2 = sin[..., :half], sin[..., half:]
    out = x * cos
    if inverse:
        out[..., :half].add_(x2 * sin2)
        out[..., half:].sub_(x1 * sin1)
    else:
        out[..., :half].sub_(x2 * sin1)
        out[..., half:].add_(x1 * sin2)
    return out


class Rotary(torch.autograd.Function):
    """The rotation, whose gradient is the inverse rotation of the incoming one: autograd's graph of
    the `torch.cat` form allocates five [B, H, S, D] tensors each way (tested against autograd's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate half-split pairs: x [B, H, S, D] with cos/sin [B, 1, S, D] (HF's `rotate_half` layout)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return Rotary.apply(x, cos, sin)
    return _rotate(x, cos, sin)
