"""The BGMV kernel against a plain per-token computation: repeated slots, runs longer than one work
item, tokens without an adapter, per-token weights, bf16 and float32 storage, ranks below the maximum."""

from __future__ import annotations

import pytest
import torch

from graftlm.lora.bgmv import GROUP, WorkItems, bgmv, kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r", [16, 5])
def test_kernel_equals_per_token_products(dtype: torch.dtype, r: int) -> None:
    assert kernel() is not None
    g = torch.Generator().manual_seed(0)
    n, in_f, out_f, slots = 3 * GROUP + 5, 40, 24, 6
    x = torch.randn(n, in_f, generator=g)
    A = torch.randn(slots, r, in_f, generator=g).to(dtype)
    B = torch.randn(slots, r, out_f, generator=g).to(dtype)
    scale = torch.rand(slots, generator=g) + 0.5
    idx = torch.randint(-1, slots, (n,), generator=g)
    idx[: 2 * GROUP + 3] = 2  # one slot used by more tokens than an item holds
    w = torch.rand(n, generator=g)
    y0 = torch.randn(n, out_f, generator=g)
    for weights in (None, w):
        y = y0.clone()
        bgmv(x, y, WorkItems.of(idx), weights, scale, A, B)
        want = y0.clone()
        for t in range(n):
            s = int(idx[t])
            if s >= 0:
                c = scale[s] * (1.0 if weights is None else weights[t])
                want[t] += c * (x[t] @ A[s].float().T) @ B[s].float()
        assert torch.allclose(y, want, atol=1e-4, rtol=1e-5)


def test_work_items_group_tokens_by_slot() -> None:
    idx = torch.tensor([3, -1, 3, 0] + [3] * GROUP)
    items = WorkItems.of(idx)
    assert items.slot.tolist() == [0, 3, 3]
    assert items.start.tolist() == [0, 1, 1 + GROUP, 3 + GROUP]
    assert sorted(items.order.tolist()) == [0, 2, 3, *range(4, 4 + GROUP)]
