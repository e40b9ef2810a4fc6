"""A LoRA layer that wraps any base projection (`nn.Linear` today, palettized layers later).

y = base(x) + s · B A x, with A [r, in], B [out, r], s = alpha / r (or alpha / sqrt(r), rsLoRA).
DoRA (Liu et al., 2024) rescales each output row: y = m / ‖W + s·BA‖_row · (W x + s · B A x) + bias,
the norm treated as a constant in the backward pass (section 4.3 of the paper), as PEFT does.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.model.linear import Linear


def base_weight(base: nn.Module) -> torch.Tensor:
    """The dense [out, in] weight of a base projection (dequantized, for layers that store it packed)."""
    dense = getattr(base, "dense_weight", None)
    return dense() if callable(dense) else base.weight


def base_shape(base: nn.Module) -> tuple[int, int]:
    """[out, in] of a base projection, without dequantizing it."""
    return base.out_features, base.in_features


def base_device(base: nn.Module) -> torch.device:
    return next(itertools.chain(base.parameters(), base.buffers())).device


class LoRAProduct(torch.autograd.Function):
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ for a frozen W and b, as a training step needs it.

    The same products autograd would run, with fewer passes over the activations: the adapter term
    accumulates into y and, in the backward pass, into the gradient for x, where autograd would copy y
    and add two separately allocated [N, in] gradients. `LoRALinear.forward`'s plain path is the reference.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        y = F.linear(x2, weight, bias)  # [N, out]
        h = torch.mm(x2, lora_A.t())  # [N, r]
        y.addmm_(h, lora_B.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, h)
        ctx.scale, ctx.x_shape = scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, weight, lora_A, lora_B, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # [N, out]
        gh = torch.mm(g, lora_B).mul_(ctx.scale)  # [N, r]: the gradient for h = x Aᵀ
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight).addmm_(gh, lora_A).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_A = torch.mm(gh.t(), x2)
        if ctx.needs_input_grad[4]:
            grad_B = torch.mm(g.t(), h).mul_(ctx.scale)
        return grad_x, None, None, grad_A, grad_B, None


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        r: int,
        scale: float,
        dropout: float = 0.0,
        use_dora: bool = False,
    ):
        super().__init__()
        out_features, in_features = base_shape(base)
        device = base_device(base)
        self.base = base
        self.r, self.scale = r, scale
        # adapters are trained and computed in float32 whatever the base dtype
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init: B = 0, so delta = 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.magnitude: nn.Parameter | None = None
        if use_dora:
            self.magnitude = nn.Parameter(self._row_norm().detach().clone())

    @classmethod
    def from_base(
        cls, base: nn.Module, r: int, scale: float, dropout: float = 0.0, use_dora: bool = False
    ) -> LoRALinear:
        for p in base.parameters():
            p.requires_grad_(False)
        return cls(base, r, scale, dropout, use_dora)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def delta_weight(self) -> torch.Tensor:
        """s · B A: [out, in], float32."""
        return self.scale * (self.lora_B @ self.lora_A)

    def _row_norm(self) -> torch.Tensor:
        return torch.linalg.norm(base_weight(self.base).float() + self.delta_weight(), dim=1)

    def _trains_plainly(self, x: torch.Tensor) -> bool:
        """Whether this call can go through `LoRAProduct`: a float32 training step of plain LoRA on a
        frozen base (no dropout, no DoRA)."""
        return (
            torch.is_grad_enabled()
            and x.dtype == torch.float32
            and self.magnitude is None
            and isinstance(self.dropout, nn.Identity)
            and not any(p.requires_grad for p in self.base.parameters())
            and (self.lora_A.requires_grad or self.lora_B.requires_grad)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._trains_plainly(x):
            w = base_weight(self.base)  # dequantized when the base is palettized
            return LoRAProduct.apply(x, w.float(), self.bias, self.lora_A, self.lora_B, self.scale)
        y = self.base(x)
        xd = self.dropout(x).float()
        h = F.linear(xd, self.lora_A)  # [..., r]
        if self.magnitude is None and y.dtype == torch.float32:
            # y + s·h Bᵀ as one GEMM that accumulates into y: no separate scale and add passes
            out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.r), self.lora_B.t(), alpha=self.scale)
            return out.view(y.shape)
        lora = F.linear(h, self.lora_B) * self.scale
        if self.magnitude is None:
            return y + lora.to(y.dtype)
        g = self.magnitude / self._row_norm().detach()  # [out]
        if isinstance(self.dropout, nn.Identity):
            plain = y.float() if self.bias is None else (y - self.bias).float()
        else:
            plain = F.linear(xd, base_weight(self.base).float())
        return y + ((g - 1) * plain + g * lora).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The dense weight with the adapter baked in, in the base dtype."""
        w = base_weight(self.base)
        merged = w.float() + self.delta_weight()
        if self.magnitude is not None:
            merged = merged * (self.magnitude / torch.linalg.norm(merged, dim=1))[:, None]
        return merged.to(w.dtype)

    def merge(self) -> nn.Linear:
        """A plain `nn.Linear` equal to this layer (for export; the base layer is left untouched)."""
        w = self.merged_weight()
        out = Linear(w.shape[1], w.shape[0], bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out
