"""GPTQ index assignment against the textbook algorithm, and what it buys."""

from __future__ import annotations

import torch

from graftlm.quant.gptq import DAMP, refine, row_values
from graftlm.quant.palette import Palette
from tests.quant.helpers import output_error


def reference_gptq(p: Palette, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Column by column with the full inverse Hessian, removing each rounded column from it (Frantar et
    al., 2023, eq. 2-3), in the same act-order; returns the indices."""
    vals = row_values(p)
    order = torch.argsort(torch.diagonal(h), descending=True)
    w, h = w[:, order].double().clone(), h[order][:, order].double()
    h = h + DAMP * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    idx = torch.empty(w.shape, dtype=torch.int64)
    for j in range(w.shape[1]):
        pick = (w[:, j, None] - vals.double()).abs().argmin(1)
        idx[:, j] = pick
        err = (w[:, j] - vals.double().gather(1, pick[:, None])[:, 0]) / hinv[j, j]
        w[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    out = torch.empty_like(idx)
    out[:, order] = idx
    return out


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix * torch.rand(d, generator=g) * 3


def test_gptq_matches_the_textbook_algorithm_and_lowers_the_output_error() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 300, generator=g)  # 300 columns: more than one block of 128
    x = correlated_inputs(2000, 300, 1)
    h = x.T @ x / x.shape[0]
    for bits in (2, 4):
        nearest = Palette.of(w, bits, group_size=16, importance=torch.diagonal(h), row_scale=True)
        refined = refine(nearest, w, h)
        assert torch.equal(refined.tables, nearest.tables) and torch.equal(refined.scales, nearest.scales)
        want = reference_gptq(nearest, w, h)
        agree = (refined.indices() == want).float().mean()
        assert agree > 0.995, f"{bits} bits: {agree:.4f} of indices agree"  # float32 vs float64 rounding ties
        before, after = output_error(nearest.dense(), w, h), output_error(refined.dense(), w, h)
        assert after < 0.8 * before, f"{bits} bits: output error {before:.1f} -> {after:.1f}"


def test_input_scales_solve_the_scaled_problem() -> None:
    """With input scales s, GPTQ on W is GPTQ on W / s under diag(s) H diag(s): the same indices."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 150, generator=g)
    x = correlated_inputs(1500, 150, 4)
    h = x.T @ x / x.shape[0]
    s = (torch.diagonal(h) ** -0.25).half().float()
    p = refine(Palette.of(w, 3, 16, importance=torch.diagonal(h), row_scale=True, in_scales=s), w, h)
    assert torch.equal(p.in_scales, s.half())
    plain = Palette(p.packed, p.tables, p.bits, p.group_size, p.in_features, p.scales)
    want = reference_gptq(plain, w / s, h * s[:, None] * s[None, :])
    assert (p.indices() == want).float().mean() > 0.995


def test_inputs_that_never_fire_are_ignored() -> None:
    w = torch.randn(16, 40)
    x = correlated_inputs(500, 40, 2)
    x[:, 5] = 0
    h = x.T @ x / x.shape[0]
    p = refine(Palette.of(w, 4, group_size=0), w, h)
    assert p.indices().shape == (16, 40) and torch.isfinite(p.dense()).all()
