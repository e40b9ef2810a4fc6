"""Error-compensating index assignment for a palette (GPTQ with the palette's tables as the grid).

Nearest-entry rounding minimises each weight's own error. What matters is the layer's output error
‖(W − Q)X‖², whose Hessian in each row is H = XᵀX over calibration inputs. GPTQ (Frantar et al., 2023,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers") rounds one input
column at a time and moves its rounding error onto the columns not yet rounded, weighted by the
inverse Hessian, so later columns absorb what earlier ones lost. Here the rounding is to the nearest
entry of each row's lookup table (times its row scale) instead of a uniform grid; the tables stay
those k-means found. With input scales s the work is done on W / s with the Hessian diag(s) H diag(s),
which measures the same output error.
"""

from __future__ import annotations

import torch

from graftlm.quant.pack import pack
from graftlm.quant.palette import Palette

DAMP = 0.01  # fraction of the mean diagonal added to H, for a stable inverse
BLOCK = 128  # columns updated together (lazy batch updates)


def row_values(p: Palette) -> torch.Tensor:
    """The values each row may take: [out, 2^bits] (its group's table times its row scale)."""
    vals = p.tables.float()[p.row_groups()]
    return vals if p.scales is None else vals * p.scales.float()[:, None]


def refine(p: Palette, weight: torch.Tensor, gram: torch.Tensor, damp: float = DAMP) -> Palette:
    """The palette with its indices re-chosen to minimise the output error on inputs with Gram matrix
    `gram` [in, in] (XᵀX / n). Columns are rounded in order of decreasing H_jj (GPTQ's act-order)."""
    w = weight.detach().float().clone()  # [out, in]
    out, inn = w.shape
    vals = row_values(p)  # [out, k]
    h = gram.detach().float().clone()
    if p.in_scales is not None:
        s = p.in_scales.float().to(w.device)
        w, h = w / s[None, :], h * s[:, None] * s[None, :]
    dead = torch.diagonal(h) <= 0  # inputs that never fire: any value is exact for them
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(inn, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # [in, in]
    idx = torch.empty(out, inn, dtype=torch.int64, device=w.device)
    for b0 in range(0, inn, BLOCK):
        b1 = min(b0 + BLOCK, inn)
        wb = w[:, b0:b1]  # a view: updates land in w
        err = torch.empty(out, b1 - b0, device=w.device)
        for j in range(b1 - b0):
            col = wb[:, j]
            pick = (col[:, None] - vals).abs().argmin(1)  # [out]
            q = vals.gather(1, pick[:, None])[:, 0]
            idx[:, b0 + j] = pick
            e = (col - q) / u[b0 + j, b0 + j]
            wb[:, j + 1 :] -= e[:, None] * u[b0 + j, b0 + j + 1 : b1][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    unordered = torch.empty_like(idx)
    unordered[:, order] = idx
    return Palette(pack(unordered, p.bits), p.tables, p.bits, p.group_size, inn, p.scales, p.in_scales)
