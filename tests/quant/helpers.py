"""A reference measure for the quantization tests."""

from __future__ import annotations

import torch


def output_error(q: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((Q − W) H (Q − W)ᵀ): the mean squared output error of Q against W on the calibration inputs."""
    d = q.float() - weight.float()
    return float(((d @ gram.float()) * d).sum())
