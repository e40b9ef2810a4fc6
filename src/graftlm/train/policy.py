"""The policy-gradient pieces of `graftlm rl`: leave-one-out advantages, token log-probabilities of sampled
answers, and the clipped (RLOO) or mirror-descent (MDLOO) loss with a KL penalty to a reference model.

RLOO (Ahmadian et al., 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
Human Feedback in LLMs"): k answers per prompt; answer i's advantage is its reward minus the mean reward
of the other k-1, an unbiased baseline that needs no value model. The ratio to the sampling policy is
clipped as in PPO when a batch of answers serves more than one update.

MDLOO (Apple, 2024, "Apple Intelligence Foundation Language Models", section 4.3): the same advantages,
with the update a mirror-descent step (Tomar et al., 2020, "Mirror Descent Policy Optimization"): instead
of clipping, the loss carries KL(π_θ ‖ π_old) / η, so every update stays close to the policy that sampled.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graftlm.errors import ConfigError
from graftlm.lora.model import lora_layers
from graftlm.model.llama import Llama
from graftlm.train.data import Batch
from graftlm.train.losses import CHUNK_ROWS, SharedPrefix, frozen_head, shared_prefix

ALGOS = ("rloo", "mdloo")


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """Advantages [P, k] from rewards [P, k] (k answers to each of P prompts): r_i - mean_{j≠i} r_j."""
    k = rewards.shape[-1]
    if k < 2:
        raise ConfigError("leave-one-out advantages need at least 2 answers per prompt (k >= 2)")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


class ChunkedLinearLogprob(torch.autograd.Function):
    """log softmax(h Wᵀ)[y] per row, for h [N, H] and a frozen W [V, H]; the gradient flows to h only.

    Logits are made `CHUNK_ROWS` rows at a time, in the forward and again in the backward, so neither the
    [N, V] logits nor their softmax is kept between the two: d logp_y / d logits = onehot(y) - softmax.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w = weight.float()
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], CHUNK_ROWS):
            logits = h[i : i + CHUNK_ROWS].float() @ w.t()  # [n, V]
            picked = logits.gather(1, labels[i : i + CHUNK_ROWS, None]).squeeze(1)
            out[i : i + len(logits)] = picked - logits.logsumexp(-1)
        ctx.save_for_backward(h, weight, labels)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        h, weight, labels = ctx.saved_tensors
        w = weight.float()
        grad_h = torch.empty_like(h, dtype=torch.float32)
        for i in range(0, h.shape[0], CHUNK_ROWS):
            g = grad[i : i + CHUNK_ROWS, None]  # [n, 1]
            probs = (h[i : i + CHUNK_ROWS].float() @ w.t()).softmax(-1).mul_(-g)  # -g · softmax
            probs.scatter_add_(1, labels[i : i + CHUNK_ROWS, None], g)  # + g · onehot(y)
            grad_h[i : i + len(probs)] = probs @ w
        return grad_h.to(h.dtype), None, None


@dataclass
class Rollouts:
    """Sampled answers after their prompts, right-padded, with which tokens are the answer's."""

    tokens: torch.Tensor  # [B, S]
    answer: torch.Tensor  # [B, S] bool: tokens[b, s] was sampled (and is scored)
    advantages: torch.Tensor  # [B]

    @classmethod
    def of(
        cls,
        prompts: list[list[int]],
        answers: list[list[int]],
        advantages: torch.Tensor,
        pad: int,
        device: torch.device | str = "cpu",
    ) -> Rollouts:
        width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        tokens = torch.full((len(prompts), width), pad, dtype=torch.long)
        answer = torch.zeros((len(prompts), width), dtype=torch.bool)
        for b, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            tokens[b, : len(p) + len(a)] = torch.tensor(p + a)
            answer[b, len(p) : len(p) + len(a)] = True
        return cls(tokens.to(device), answer.to(device), advantages.float().to(device))

    def rows(self, idx: slice) -> Rollouts:
        return Rollouts(self.tokens[idx], self.answer[idx], self.advantages[idx])

    @property
    def seq(self) -> torch.Tensor:
        """[N]: which row each answer token belongs to (the order `token_logprobs` returns them in)."""
        return self.answer.nonzero()[:, 0]


def token_logprobs(model: Llama, batch: Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """log π(token | before) of every answer token [N], row by row (the order of `Rollouts.seq`).

    The k answers to one prompt share it: its keys and values are computed once for all rows
    (`SharedPrefix`, exact, as in SFT's `completion_loss`)."""
    tokens = batch.tokens
    n = shared_prefix(model, Batch(tokens, batch.answer, 0))
    if n:
        cache = SharedPrefix(tokens.shape[0])
        model.hidden(tokens[:1, :n], cache=cache)
        h = model.hidden(tokens[:, n:], cache=cache, start=n)  # [B, S - n, hidden]
    else:
        h = model.hidden(tokens)  # [B, S, hidden]
    pick = batch.answer[:, n + 1 :]  # token s+1 is predicted from position s
    hs = model.norm(h[:, :-1][pick])  # [N, hidden]
    labels = tokens[:, n + 1 :][pick]
    head = frozen_head(model)
    if head is None or temperature != 1.0:
        logits = model.lm_head(hs).float() / temperature
        return logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    return ChunkedLinearLogprob.apply(hs, head, labels)


@dataclass(frozen=True)
class LossTerms:
    loss: torch.Tensor  # the scalar to minimise (mean over rows of each row's mean over its tokens)
    kl_ref: float  # mean per-token KL(π_θ ‖ π_ref) estimate (k3, Schulman 2020)
    kl_ref_seq: float  # mean per-answer sum of log π_θ - log π_ref: KL of whole answers
    clipped: float  # share of tokens whose ratio the clip held (RLOO)


def k3(logp: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_other) from samples of π: e^{o-p} - (o-p) - 1 (>= 0, unbiased)."""
    d = other - logp
    return d.exp() - d - 1


def policy_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor,
    seq: torch.Tensor,
    advantages: torch.Tensor,
    algo: str = "rloo",
    beta: float = 0.05,
    clip: float = 0.2,
    eta: float = 1.0,
) -> LossTerms:
    """The loss over answer tokens [N] (log-probs now, at sampling, under the reference; their rows `seq`)
    with one advantage per row [B].

    rloo:  -min(ρA, clip(ρ, 1±ε)A) + β·KL(π_θ‖π_ref)               ρ = π_θ / π_old per token
    mdloo: -ρA + KL(π_θ‖π_old)/η + β·KL(π_θ‖π_ref)                  KL(π_θ‖π_old) ≈ ρ log ρ - ρ + 1 under π_old
    Each row's tokens are averaged, then the rows: every answer weighs the same whatever its length.
    """
    if algo not in ALGOS:
        raise ConfigError(f"unknown algorithm {algo!r}; choose from {', '.join(ALGOS)}")
    a = advantages[seq]  # [N]
    log_ratio = logp - old
    ratio = log_ratio.exp()
    clipped = torch.zeros((), dtype=torch.float32, device=seq.device)
    if algo == "rloo":
        plain, held = ratio * a, ratio.clamp(1 - clip, 1 + clip) * a
        per_token = -torch.minimum(plain, held)
        clipped = (held < plain).float().mean()
    else:
        per_token = -ratio * a + (ratio * log_ratio - ratio + 1) / eta
    per_token = per_token + beta * k3(logp, ref)
    rows = advantages.shape[0]
    counts = torch.bincount(seq, minlength=rows).clamp(min=1).float()
    loss = (torch.zeros(rows, dtype=per_token.dtype, device=seq.device).index_add(0, seq, per_token) / counts).mean()
    with torch.no_grad():
        kl_seq = torch.zeros(rows, device=seq.device).index_add(0, seq, (logp - ref).float())
    return LossTerms(loss, float(k3(logp, ref).mean().detach()), float(kl_seq.mean()), float(clipped))


@contextmanager
def adapter_off(model: nn.Module) -> Iterator[None]:
    """The base model alone inside the block: every LoRA layer's scale set to 0, then restored."""
    layers = [layer for _, layer in lora_layers(model)]  # type: ignore[arg-type]
    scales = [layer.scale for layer in layers]
    try:
        for layer in layers:
            layer.scale = 0.0
        yield
    finally:
        for layer, s in zip(layers, scales, strict=True):
            layer.scale = s


@contextmanager
def swapped(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """`params` hold `values` inside the block (the reference adapter), their own weights after it."""
    saved = {k: p.detach().clone() for k, p in params.items()}
    try:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(values[k])
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])
