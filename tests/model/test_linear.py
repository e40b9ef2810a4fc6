"""The decode kernel against `F.linear` (the reference), and when it must step aside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graftlm.model import linear
from graftlm.model.linear import MAX_ROWS, Linear
from graftlm.native import FasterPath

needs_kernel = pytest.mark.skipif(linear.kernel() is None, reason="no C compiler for the gemv kernel")


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 8])
# in_f below, at and off the 32-wide unroll; 1536 and 1100: the widest rows decoding sends to the kernel;
# 4, 5 and 8 rows: whole tiles of four rows and the rows left over; out_f 7, 33: weight rows past the tiles
@pytest.mark.parametrize("shape", [(64, 576), (7, 33), (1536, 19), (40, 1536), (33, 1100)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_equals_f_linear(rows: int, shape: tuple[int, int], bias: bool) -> None:
    g = torch.Generator().manual_seed(rows * 100 + shape[1])
    out_f, in_f = shape
    x = torch.randn(rows, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    got = linear.gemv(x, w, b)
    # sums of up to 1536 products of size ~1 in another order: float32 rounding reaches ~1e-5 absolute
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=2e-4)


@needs_kernel
def test_linear_takes_the_kernel_only_where_it_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear.paths, "force", True)  # as if the kernel had timed faster
    calls: list[int] = []
    real = linear.gemv
    monkeypatch.setattr(linear, "gemv", lambda x, w, b=None: calls.append(x.shape[0]) or real(x, w, b))
    layer = Linear(32, 16)
    x = torch.randn(3, 1, 32)  # one new token for each of three sequences
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert calls == [3]
        layer(torch.randn(1, MAX_ROWS + 1, 32))  # a prefill: the BLAS product
        layer(torch.randn(1, 64)[:, ::2])  # a strided input
        layer.to(torch.bfloat16)(torch.randn(1, 32, dtype=torch.bfloat16))
    assert calls == [3]
    layer.float()
    x = torch.randn(1, 32, requires_grad=True)
    layer(x).sum().backward()  # training needs autograd's product
    assert calls == [3] and x.grad is not None and layer.weight.grad is not None


def test_linear_is_an_nn_linear_with_its_state_dict() -> None:
    layer, plain = Linear(8, 4), nn.Linear(8, 4)
    plain.load_state_dict(layer.state_dict())
    assert isinstance(layer, nn.Linear) and layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x))


@needs_kernel
def test_linear_times_both_paths_then_keeps_one_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = FasterPath("gemv", trials=3)
    monkeypatch.setattr(linear, "paths", paths)
    layer = Linear(40, 24)
    with torch.no_grad():
        for rows in (1, 4):
            for _ in range(8):
                x = torch.randn(rows, 40)
                # whichever path a call takes, the result is the product
                torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    keys = {(1, 24, 40, torch.get_num_threads()), (4, 24, 40, torch.get_num_threads())}
    assert set(paths.chosen) == keys and paths.times == {}
