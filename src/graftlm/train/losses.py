"""Next-token cross-entropy on target positions only (the logits of other positions are never built).

With a frozen output layer the loss goes through `ChunkedLinearCrossEntropy`: logits are made a chunk
of rows at a time and the gradient for the hidden states is computed right away, so the [N, vocab]
logits, their log-softmax and its gradient never exist in full (the idea of Liger-Kernel's fused
linear cross-entropy). `plain_loss` is the reference it is tested against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from graftlm.lora.layer import base_weight
from graftlm.model.llama import Llama
from graftlm.train.data import Batch

CHUNK_ROWS = 512  # a [512, vocab] float32 logits buffer: 100 MB for a 49K vocabulary


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i Wᵀ, y_i) for h [N, H] and a frozen W [V, H]; gradient flows to h only."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h, dtype=torch.float32) if h.requires_grad else None
        w = weight.float()
        # one logits buffer for every chunk: large fresh allocations cost page faults on the CPU
        buf = torch.empty(min(CHUNK_ROWS, h.shape[0]), w.shape[0], dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], CHUNK_ROWS):
            hc, yc = h[i : i + CHUNK_ROWS].float(), labels[i : i + CHUNK_ROWS]
            logits = torch.mm(hc, w.t(), out=buf[: len(yc)])  # [n, V]
            picked = logits.gather(1, yc[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: unnormalised softmax
            mass = probs.sum(dim=-1, keepdim=True)
            total += (top.squeeze(1) + mass.squeeze(1).log() - picked).sum()
            if grad is not None:
                probs.div_(mass)
                probs[torch.arange(len(yc)), yc] -= 1.0
                torch.mm(probs, w, out=grad[i : i + len(yc)])
        ctx.save_for_backward(grad)
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.h_dtype), None, None


def plain_loss(model: Llama, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.logits(h), labels, reduction="sum")


def completion_loss(model: Llama, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's target tokens, and how many there are.

    Right padding keeps every real token's keys before its padding, so plain causal attention is exact.
    """
    h = model.hidden(batch.tokens)  # [B, S, hidden]
    pick = batch.targets[:, 1:]  # token s+1 is predicted from position s
    hs = h[:, :-1][pick]  # [N, hidden]: only where a target is scored
    labels = batch.tokens[:, 1:][pick]
    head = base_weight(model.lm_head)  # dequantized when the head is palettized
    if head.requires_grad or model.lm_head.bias is not None:
        return plain_loss(model, hs, labels), int(pick.sum())
    return ChunkedLinearCrossEntropy.apply(model.norm(hs), head, labels), int(pick.sum())
