"""Rotary position embeddings (Su et al., 2021, RoFormer), with linear and Llama 3 frequency scaling."""

from __future__ import annotations

import math

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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate half-split pairs: x [B, H, S, D] with cos/sin [B, 1, S, D] (HF's `rotate_half` layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin
