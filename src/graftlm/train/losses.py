"""Next-token cross-entropy on target positions only (the logits of other positions are never built).

With a frozen output layer the loss goes through `ChunkedLinearCrossEntropy`: logits are made a chunk
of rows at a time and the gradient for the hidden states is computed right away, so the [N, vocab]
logits, their log-softmax and its gradient never exist in full (the idea of Liger-Kernel's fused
linear cross-entropy). `plain_loss` is the reference it is tested against.

Chat training data repeats the system prompt and the task's instruction at the start of every example
(20-40% of the example tasks' tokens). Their hidden states are the same in every row, since causal
attention lets them see only each other, so `completion_loss` runs a prefix that all rows of a batch
share once, as a batch of one, and the rest of each row behind its keys and values (`SharedPrefix`):
a serving engine's prefix cache, kept in the autograd graph. Exact: the backward of broadcasting the one
prefix to every row sums the rows' gradients, as the per-row copies would have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.lora.layer import base_weight
from graftlm.model.llama import Llama
from graftlm.train.data import Batch

CHUNK_ROWS = 512  # a [512, vocab] float32 logits buffer: 100 MB for a 49K vocabulary
MIN_SHARED = 8  # shorter shared prefixes are not worth a separate forward pass


def _chunked_head_loss(
    ctx: Any, h: torch.Tensor, weight: torch.Tensor, chunk_loss: Callable[[torch.Tensor, int, int, bool], torch.Tensor]
) -> torch.Tensor:
    """Σ over rows of a loss of the logits h Wᵀ, made `CHUNK_ROWS` rows at a time (the forward pass of
    the two Functions below). `chunk_loss(logits, i, j, want_grad)` returns rows i..j-1's loss and, when
    asked, leaves d loss / d logits in `logits`; the gradient for h is made at once and saved."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad = torch.empty_like(h, dtype=torch.float32) if h.requires_grad else None
    w = weight.float()
    # one logits buffer for every chunk: large fresh allocations cost page faults on the CPU
    buf = torch.empty(min(CHUNK_ROWS, h.shape[0]), w.shape[0], dtype=torch.float32, device=h.device)
    for i in range(0, h.shape[0], CHUNK_ROWS):
        hc = h[i : i + CHUNK_ROWS].float()
        logits = torch.mm(hc, w.t(), out=buf[: len(hc)])  # [n, V]
        total += chunk_loss(logits, i, i + len(hc), grad is not None)
        if grad is not None:
            torch.mm(logits, w, out=grad[i : i + len(hc)])
    ctx.save_for_backward(grad)
    ctx.h_dtype = h.dtype
    return total


def _saved_gradient(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
    (grad,) = ctx.saved_tensors
    return (grad * grad_out).to(ctx.h_dtype), None, None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i Wᵀ, y_i) for h [N, H] and a frozen W [V, H]; gradient flows to h only."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        def chunk_loss(logits: torch.Tensor, i: int, j: int, want_grad: bool) -> torch.Tensor:
            yc = labels[i:j]
            picked = logits.gather(1, yc[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: unnormalised softmax
            mass = probs.sum(dim=-1, keepdim=True)
            loss = (top.squeeze(1) + mass.squeeze(1).log() - picked).sum()
            if want_grad:
                probs.div_(mass)
                probs[torch.arange(len(yc)), yc] -= 1.0
            return loss

        return _chunked_head_loss(ctx, h, weight, chunk_loss)

    backward = staticmethod(_saved_gradient)


class ChunkedLinearKL(torch.autograd.Function):
    """Σ_i KL(teacher_i ‖ softmax(h_i Wᵀ)) for h [N, H] and a frozen W [V, H]; gradient flows to h only.

    `teacher(i, j)` gives the teacher's logits for rows i..j-1 (no gradient). As for the cross-entropy,
    the gradient (p_student − p_teacher) W is made chunk by chunk in the forward pass, so neither side's
    [N, vocab] distributions are ever kept for the backward pass.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, teacher: Callable[[int, int], torch.Tensor]
    ) -> torch.Tensor:
        def chunk_loss(logits: torch.Tensor, i: int, j: int, want_grad: bool) -> torch.Tensor:
            t_logp = teacher(i, j).float()
            t_logp = t_logp.sub_(t_logp.logsumexp(dim=-1, keepdim=True))  # [n, V]
            s_logp = logits.sub_(logits.logsumexp(dim=-1, keepdim=True))
            p_t = t_logp.exp()
            loss = t_logp.sub_(s_logp).mul_(p_t).sum()  # Σ p_t (log p_t − log p_s)
            if want_grad:
                s_logp.exp_().sub_(p_t)
            return loss

        return _chunked_head_loss(ctx, h, weight, chunk_loss)

    backward = staticmethod(_saved_gradient)


def frozen_head(model: Llama) -> torch.Tensor | None:
    """The output head's weight (dequantized when palettized) when the chunked losses may take it: it
    trains nothing and has no bias. None: the loss must go through the plain logits."""
    head = base_weight(model.lm_head)
    return None if head.requires_grad or model.lm_head.bias is not None else head


def plain_loss(model: Llama, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.logits(h), labels, reduction="sum")


class SharedPrefix:
    """The keys and values of a prefix that every row begins with, computed once and put before each row's own.

    Used as the model's `cache`: the call at start 0 (the prefix, one row) records each layer's keys and
    values, the call at start P (every row's remainder) gets them broadcast to all rows in front of its own.
    """

    def __init__(self, rows: int):
        self.rows = rows
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> k, v [1, KV, P, D]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if start == 0:
            self.kv[layer] = (k, v)
            return k, v
        pk, pv = self.kv[layer]
        shape = (self.rows, *pk.shape[1:])
        return torch.cat([pk.expand(shape), k], dim=2), torch.cat([pv.expand(shape), v], dim=2)


def shared_prefix(model: nn.Module, batch: Batch) -> int:
    """How many leading positions every row shares and no target is predicted from; 0 when not worth sharing.

    LoRA dropout in training draws its own mask for each row, which one shared prefix cannot do, so a
    model that trains with dropout gets 0.
    """
    tokens, rows = batch.tokens, batch.tokens.shape[0]
    if rows < 2 or (model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())):
        return 0
    same = (tokens == tokens[:1]).all(dim=0).long().cumprod(dim=0)  # [S]: 1 while every row agrees
    predicted = batch.targets[:, 1:].any(dim=0).nonzero()  # positions whose next token is a target
    first = int(predicted[0]) if len(predicted) else tokens.shape[1] - 1
    n = min(int(same.sum()), first)
    return n if n >= MIN_SHARED else 0


def completion_loss(model: Llama, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's target tokens, and how many there are.

    Right padding keeps every real token's keys before its padding, so plain causal attention is exact.
    """
    n = shared_prefix(model, batch)
    if n:
        cache = SharedPrefix(batch.tokens.shape[0])
        model.hidden(batch.tokens[:1, :n], cache=cache)  # the prefix's keys and values, once
        h = model.hidden(batch.tokens[:, n:], cache=cache, start=n)  # [B, S - n, hidden]
    else:
        h = model.hidden(batch.tokens)  # [B, S, hidden]
    pick = batch.targets[:, n + 1 :]  # token s+1 is predicted from position s
    hs = h[:, :-1][pick]  # [N, hidden]: only where a target is scored
    labels = batch.tokens[:, n + 1 :][pick]
    head = frozen_head(model)
    if head is None:
        return plain_loss(model, hs, labels), int(pick.sum())
    return ChunkedLinearCrossEntropy.apply(model.norm(hs), head, labels), int(pick.sum())
