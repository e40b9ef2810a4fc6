"""LoRALinear's fused training product against autograd over the plain expression."""

from __future__ import annotations

import pytest
import torch

from graftlm.lora.layer import LoRALinear
from graftlm.model.linear import Linear


def _layer(bias: bool) -> LoRALinear:
    torch.manual_seed(0)
    base = Linear(24, 40, bias=bias)
    layer = LoRALinear.from_base(base, r=4, scale=1.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_fused_training_product_equals_autograd(bias: bool, x_needs_grad: bool) -> None:
    layer = _layer(bias)
    x = torch.randn(3, 5, 24, requires_grad=x_needs_grad)
    up = torch.randn(3, 5, 40)
    assert layer._trains_plainly(x)
    (layer(x) * up).sum().backward()
    got = [layer.lora_A.grad, layer.lora_B.grad, x.grad]

    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_(x_needs_grad)
    w, bb = layer.base.weight, layer.base.bias
    want_y = x_ref @ w.T + (0 if bb is None else bb) + 1.5 * (x_ref @ a.T) @ b.T
    (want_y * up).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want_y)
    for mine, ref in zip(got, [a.grad, b.grad, x_ref.grad], strict=True):
        assert (mine is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    assert layer.base.weight.grad is None  # the base stays frozen


def test_plain_path_when_the_fused_one_does_not_apply() -> None:
    layer = _layer(False)
    x = torch.randn(2, 24)
    with torch.no_grad():
        assert not layer._trains_plainly(x)
    assert not layer._trains_plainly(x.double())
    layer.dropout = torch.nn.Dropout(0.1)
    assert not layer._trains_plainly(x)
