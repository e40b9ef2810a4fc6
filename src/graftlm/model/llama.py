"""The Llama-family forward: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, tied or untied embeddings.

Projections are `nn.Linear` attributes (`graftlm.model.linear.Linear`: a kernel for decoding's few-row
products) named as in Hugging Face checkpoints (`q_proj`, ...), so LoRA and palettized layers can replace
them by composition without touching this file.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from graftlm.model.config import LlamaConfig
from graftlm.model.fingerprint import weights_fingerprint
from graftlm.model.linear import Linear
from graftlm.model.rope import RotaryTable, apply_rotary


class RowAdapters(Protocol):
    """The seam for per-row adapters: which adapter (or mix) each row of a batch uses. The model only
    carries it to the projections that take it; what it holds is up to them (`graftlm.lora.batched`)."""

    @property
    def any(self) -> bool:
        """Does any row use an adapter?"""
        ...


class RowAdaptedProjection(Protocol):
    """A projection that computes a different adapter per row: the forward passes it the batch's
    `RowAdapters` through `forward_rows` (every other projection is called plainly)."""

    def forward_rows(self, x: torch.Tensor, adapters: RowAdapters) -> torch.Tensor: ...


class KVStore(Protocol):
    """Where attention keeps keys and values between calls: the engine's `KVCache`, or training's
    `SharedPrefix` (`graftlm.train.losses`)."""

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take k, v [B, KV, S, D] for positions [start, start+S); return all keys and values up to start+S."""
        ...


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x²) + eps) over the last dimension, kept as [..., 1]."""
    return torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))


class RMSNormFunction(torch.autograd.Function):
    """weight · x / rms(x) for float32 x and weight, with a hand-written backward: `F.rms_norm` and
    autograd's graph of it pass over the activations several times each way (benchmarks/README.md,
    "RMSNorm's hand-written backward"; tested against autograd's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        rstd = inverse_rms(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd
        grad_w = (grad * xhat).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        gw = grad * weight
        # d/dx of w·x·r, r = (mean(x²) + eps)^-1/2:  r · (g·w - x̂ · mean(g·w·x̂))
        dot = (gw * xhat).mean(-1, keepdim=True)
        grad_x = gw.sub_(xhat.mul_(dot)).mul_(rstd) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), normalised in float32 as in HF Llama."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return RMSNormFunction.apply(x, self.weight, self.eps)
        xf = x.float()
        return self.weight * (xf * inverse_rms(xf, self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, s, _ = x.shape  # x: [B, S, hidden]
        q = ctx.project(self.q_proj, x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = ctx.project(self.k_proj, x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, S, D]
        v = ctx.project(self.v_proj, x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, ctx.start, k, v)  # [B, KV, start+S, D]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal, enable_gqa=self.n_kv != self.n_heads
        )
        return ctx.project(self.o_proj, out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


class SiluMul(torch.autograd.Function):
    """silu(gate) * up with its gradient in one expression: autograd's version allocates and passes over
    [N, intermediate] activations five times in the backward pass (tested against autograd's)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        grad_up = (gate * sig).mul_(grad)  # silu(gate) * grad
        # d silu / d gate = sig * (1 + gate * (1 - sig))
        grad_gate = torch.rsub(sig, 1).mul_(gate).add_(1).mul_(sig).mul_(grad).mul_(up)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMul.apply(gate, up)
    return F.silu(gate).mul_(up)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        gate, up = ctx.project(self.gate_proj, x), ctx.project(self.up_proj, x)
        return ctx.project(self.down_proj, silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class ForwardContext:
    """What every layer needs for one forward call: rotary tables, the cache and the attention mask."""

    def __init__(
        self,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVStore | None,
        start: int,
        mask: torch.Tensor | None,
        is_causal: bool,
        adapters: RowAdapters | None = None,
    ):
        self.cos, self.sin = cos, sin  # [B, 1, S, D]
        self.cache, self.start = cache, start
        self.mask, self.is_causal = mask, is_causal  # mask: [B, 1, S, start+S] bool, True = attend
        self.adapters = adapters  # which adapter slot each row uses

    def project(self, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Apply a projection; a `RowAdaptedProjection` also gets the rows' adapter choice."""
        if self.adapters is not None:
            rows = getattr(proj, "forward_rows", None)
            if rows is not None:
                return rows(x, self.adapters)
        return proj(x)


def attention_mask(
    key_valid: torch.Tensor | None, start: int, seq_len: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """The mask for queries at [start, start+S) over keys [0, start+S); None when SDPA's own flag does.

    key_valid: [B, start+S] bool, False on left-padding. Padding queries attend to themselves only, so
    no row of the softmax is empty.
    """
    total = start + seq_len
    if key_valid is None or bool(key_valid.all()):
        if seq_len == 1:
            return None, False
        if start == 0:
            return None, True
    q_pos = torch.arange(start, total, device=device)
    k_pos = torch.arange(total, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [S, T]
    if key_valid is None:
        return causal[None, None], False
    mask = causal[None] & key_valid[:, None, :]  # [B, S, T]
    mask = mask | (k_pos[None, None, :] == q_pos[None, :, None])
    return mask[:, None], False


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_head()
        self.rotary = RotaryTable(config)
        self._fingerprint: str | None = None
        # training: the first `recompute` layers keep only their input for the backward pass and run again
        # in it (activation checkpointing), trading time for memory that grows with the tokens of a batch
        self.recompute = 0

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Keep the rotary tables (plain tensors, not buffers) on the model's device but in float32.
        super()._apply(fn, recurse)
        self.rotary.to(self.device)
        return self

    def tie_head(self) -> None:
        """Make the output head share the embedding's weight (or its palettized indices and tables)."""
        shared = getattr(self.embed_tokens, "lut", None)
        if shared is not None:
            self.lm_head = shared
        else:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in (that of the norms; palettized weights are dequantized to it)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVStore | None = None,
        start: int = 0,
        key_valid: torch.Tensor | None = None,
        last_only: bool = False,
        adapters: RowAdapters | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `tokens` [B, S] at cache offset `start`: [B, S, V], or [B, 1, V] with `last_only`.

        positions: [B, S] rotary positions (default start..start+S-1); key_valid: [B, start+S] bool;
        adapters: the adapter slot of each row (see `graftlm.lora.slots`); attn_mask: an explicit
        [B, 1, S, T] bool mask (True = attend) for callers whose rows sit at different offsets.
        """
        h = self.hidden(tokens, positions, cache, start, key_valid, adapters, attn_mask)
        return self.logits(h[:, -1:] if last_only else h)

    def hidden(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVStore | None = None,
        start: int = 0,
        key_valid: torch.Tensor | None = None,
        adapters: RowAdapters | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last decoder layer's output [B, S, hidden], before the final norm (see `forward`)."""
        ctx = self.context(tokens, positions, cache, start, key_valid, adapters, attn_mask)
        x = self.embed_tokens(tokens)
        recompute = self.recompute if torch.is_grad_enabled() else 0
        for i, layer in enumerate(self.layers):
            # a recomputed layer keeps only its input; its activations are made again in the backward
            x = checkpoint(layer, x, ctx, use_reentrant=False) if i < recompute else layer(x, ctx)
        return x

    def context(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVStore | None = None,
        start: int = 0,
        key_valid: torch.Tensor | None = None,
        adapters: RowAdapters | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> ForwardContext:
        """What the decoder layers need to run on `tokens` [B, S] (see `forward`): rotary tables and mask."""
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(start, start + s, device=tokens.device).expand(b, s)
        cos, sin = self.rotary.lookup(positions)
        if attn_mask is not None:
            mask, is_causal = attn_mask, False
        else:
            mask, is_causal = attention_mask(key_valid, start, s, tokens.device)
        dtype = self.dtype
        if adapters is not None and not adapters.any:
            adapters = None
        return ForwardContext(cos.to(dtype), sin.to(dtype), cache, start, mask, is_causal, adapters)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [..., V] from hidden states [..., hidden] (so training can pick positions first)."""
        return self.lm_head(self.norm(h)).float()

    def fingerprint(self) -> str:
        """sha256 of the base weights (computed once; adapters record it to name the base they fit)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self)
        return self._fingerprint

    def num_parameters(self) -> int:
        """Parameters of the model as trained: a palettized weight counts its [out, in] values."""
        dense = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        packed = {id(m): m for m in self.modules() if hasattr(m, "num_weights")}
        return dense + sum(m.num_weights for m in packed.values())
