"""Many adapters in one forward pass: each row of a batch uses its own adapter, a weighted mix, or none.

Adapters are loaded into numbered slots; every projection keeps its slots stacked (Punica / S-LoRA):
  A      [n_slots, r_max, in]   as PEFT stores it, zero-padded to r_max so adapters of any rank share one stack
  B      [n_slots, r_max, out]  B transposed (the kernel streams its rows)
  scale  [n_slots]              the adapter's alpha / r (kept apart so 16-bit storage stays exact)
  gain   [n_slots, out]         DoRA's m / ‖W + s·BA‖ per output row; 1 for plain LoRA
A and B are stored in `dtype` (bfloat16 for serving: adapters are stored in 16 bits anyway) and
computed in float32.

A forward takes `AdapterBatch.slots` [B, K] (-1 = nothing) and `weights` [B, K]; row b gets
  y_b = gain[s_b0] ⊙ (W x_b + Σ_k w_bk · scale[s_bk] · B[s_bk] A[s_bk] x_b) + bias,
so K > 1 composes adapters at serve time (Apple's stacked adapters) without writing a merged copy
(gain is 1 for composed rows: DoRA adapters are not composed). Ways to compute it: the BGMV kernel
(`kernel`, see `bgmv.py`: each token reads its adapter once, one call per projection); gathering each
row's matrices for batched matmuls (`gather`); a loop over the distinct adapters (`grouped`, plain
GEMMs, best for long prompts). `auto` picks by a cost rule measured here; `reference` is the plain
per-row loop all are tested against; `benchmarks/multi_lora.py` measures them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.lora.bgmv import WorkItems, bgmv, kernel
from graftlm.lora.layer import base_device, base_shape, base_weight

STRATEGIES = ("auto", "kernel", "gather", "grouped", "reference")
# `auto` uses the kernel up to this many tokens per distinct adapter (beyond it one GEMM pair per adapter
# wins), and otherwise loops while distinct adapters are at most this fraction of the rows
# (benchmarks/README.md, "Multi-adapter strategy").
KERNEL_MAX_TOKENS_PER_ADAPTER = 32
GROUP_WHEN_DISTINCT_PER_ROW = 0.6

RowAdapters = int | Sequence[tuple[int, float]]  # a slot (-1 = none), or (slot, weight) pairs


@dataclass
class AdapterBatch:
    slots: torch.Tensor  # [B, K] long, slot per row and column, -1 = nothing
    weights: torch.Tensor | None = None  # [B, K] float32; None = all 1
    strategy: str = "auto"
    seq_len: int = 1  # tokens per row in the forward this batch is for (decode: 1)
    token_level: bool = False  # slots name every token of a [1, T] input (packed prompts), not rows
    _tokens: dict[tuple[int, int], tuple[WorkItems, torch.Tensor | None]] = field(default_factory=dict, repr=False)
    _groups: list[tuple[int, torch.Tensor, torch.Tensor | None]] | None = field(default=None, repr=False)
    _runs: list[tuple[int, int, int]] | bool | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.slots.dim() == 1:
            self.slots = self.slots[:, None]
        if self.weights is not None and self.weights.dim() == 1:
            self.weights = self.weights[:, None]
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        native = self.slots.device.type == "cpu" and kernel() is not None  # the C kernel reads CPU memory only
        if self.strategy == "kernel" and not native:
            self.strategy = "auto"  # no compiler here, or not on the CPU: fall back to PyTorch
        if self.strategy == "auto" and self.slots.device.type != "cpu":
            # on a GPU, grouping costs host syncs per adapter (~35 ms per distinct adapter a step on an
            # H200) while gather runs as a few batched kernels with none (issue 34's measurements)
            self.strategy = "gather"
        if self.strategy == "auto":
            pairs = int((self.slots >= 0).sum())
            distinct = max(1, len(self.groups()))
            tokens = pairs * self.seq_len
            if native and tokens <= KERNEL_MAX_TOKENS_PER_ADAPTER * distinct:
                self.strategy = "kernel"
            else:
                few = distinct <= GROUP_WHEN_DISTINCT_PER_ROW * pairs
                self.strategy = "grouped" if few else "gather"

    @classmethod
    def of(
        cls,
        rows: Sequence[RowAdapters],
        strategy: str = "auto",
        device: torch.device | str = "cpu",
        seq_len: int = 1,
    ) -> AdapterBatch:
        """From one entry per row: a slot number (-1 = none) or a list of (slot, weight) pairs."""
        cols = [[(r, 1.0)] if isinstance(r, int) else list(r) or [(-1, 1.0)] for r in rows]
        k = max(len(c) for c in cols)
        slots = [[s for s, _ in c] + [-1] * (k - len(c)) for c in cols]
        weights = [[w for _, w in c] + [0.0] * (k - len(c)) for c in cols]
        plain = k == 1 and all(w == 1.0 for row in weights for w in row)
        return cls(
            torch.tensor(slots, dtype=torch.long, device=device),
            None if plain else torch.tensor(weights, dtype=torch.float32, device=device),
            strategy,
            seq_len,
        )

    @property
    def any(self) -> bool:
        return bool((self.slots >= 0).any())

    def per_token(self, k: int, seq_len: int) -> tuple[WorkItems, torch.Tensor | None]:
        """Column k for the kernel: the tokens of a [B, seq_len] input grouped by slot, and each token's
        weight (computed once per forward, shared by every projection)."""
        key = (k, seq_len)
        if key not in self._tokens:
            idx = self.slots[:, k].repeat_interleave(seq_len)
            w = None if self.weights is None else self.weights[:, k].repeat_interleave(seq_len).contiguous()
            self._tokens[key] = (WorkItems.of(idx), w)
        return self._tokens[key]

    def runs(self) -> list[tuple[int, int, int]] | None:
        """(slot, first row, end row) when every adapter's rows are one contiguous run, each row has at
        most one adapter and no weights; None otherwise (computed once per forward)."""
        if self._runs is None:
            ok = self.slots.shape[1] == 1 and self.weights is None
            runs = []
            for slot, rows, _ in self.groups() if ok else []:
                a, b = int(rows[0]), int(rows[-1]) + 1
                if b - a != len(rows):
                    ok = False
                    break
                runs.append((slot, a, b))
            self._runs = runs if ok else False
        return None if self._runs is False else self._runs  # type: ignore[return-value]

    def groups(self) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """(slot, row indices, row weights or None) for every adapter used, computed once per forward."""
        if self._groups is None:
            self._groups = []
            for s in self.slots.unique().tolist():
                if s < 0:
                    continue
                rows, cols = (self.slots == s).nonzero(as_tuple=True)
                w = None if self.weights is None else self.weights[rows, cols]
                self._groups.append((int(s), rows, w))
        return self._groups


class MultiLoRALinear(nn.Module):
    """A base projection plus `n_slots` adapter slots, applied per row."""

    def __init__(self, base: nn.Module, n_slots: int, r_max: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        out_f, in_f = base_shape(base)
        dev = base_device(base)
        self.base = base
        self.r_max = r_max
        self.register_buffer("A", torch.zeros(n_slots, r_max, in_f, device=dev, dtype=dtype), persistent=False)
        self.register_buffer("B", torch.zeros(n_slots, r_max, out_f, device=dev, dtype=dtype), persistent=False)
        self.register_buffer("scale", torch.ones(n_slots, device=dev), persistent=False)
        self.register_buffer("gain", torch.ones(n_slots, out_f, device=dev), persistent=False)
        self.active = [False] * n_slots  # does slot s hold weights for this projection?
        self.dora = [False] * n_slots  # does slot s rescale rows (gain != 1)?
        self.scales = [1.0] * n_slots  # `scale` as Python floats, for GEMM alphas

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def set_slot(
        self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor | None = None
    ) -> None:
        """Load A [r, in] and B [out, r] (PEFT's shapes) into `slot`."""
        r = A.shape[0]
        if r > self.r_max:
            raise ValueError(f"adapter rank {r} exceeds the slots' maximum rank {self.r_max}")
        # write in place, converting as we go: a cold load is one pass over the adapter
        self.A[slot, :r].copy_(A)
        self.B[slot, :r].copy_(B.T)
        if r < self.r_max:
            self.A[slot, r:].zero_()
            self.B[slot, r:].zero_()
        self.scale[slot] = scale
        self.scales[slot] = float(scale)
        if magnitude is not None:
            w = base_weight(self.base).float() + (self._a(slot) @ self._b(slot)).T
            self.gain[slot] = magnitude.float() / torch.linalg.norm(w, dim=1)
        elif self.dora[slot]:
            self.gain[slot].fill_(1.0)
        self.dora[slot] = magnitude is not None
        self.active[slot] = True

    def clear_slot(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        if self.dora[slot]:
            self.gain[slot].fill_(1.0)
        self.active[slot] = False
        self.dora[slot] = False

    def _a(self, slot: int) -> torch.Tensor:
        return self.A[slot].float().T  # [in, r]

    def _b(self, slot: int) -> torch.Tensor:
        return self.B[slot].float() * self.scale[slot]  # [r, out], scaled

    def forward_rows(self, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """The model's seam (`graftlm.model.llama.RowAdaptedProjection`): base output plus each row's adapter."""
        return self.forward(x, batch)

    def forward(self, x: torch.Tensor, batch: AdapterBatch | None = None) -> torch.Tensor:
        if batch is not None and batch.token_level:  # packed prompts: every token is a row of its own
            b, s, _ = x.shape
            return self._apply(x.reshape(b * s, 1, -1), batch).reshape(b, s, -1)
        return self._apply(x, batch)

    def _apply(self, x: torch.Tensor, batch: AdapterBatch | None) -> torch.Tensor:
        y = self.base(x)  # x: [B, S, in] -> y: [B, S, out]
        if batch is None:
            return y
        if batch.strategy == "reference":
            return self._reference(x, y, batch)
        gain = self._row_gain(batch)
        in_place = gain is None and y.dtype == torch.float32 and y.is_contiguous()
        if batch.strategy == "grouped" and in_place and self._ranges_in_place(x, y, batch):
            return y
        if batch.strategy == "kernel":
            if in_place:
                self._kernel(x, y, batch)  # add straight into the base output
                return y
            delta = torch.zeros(*y.shape, dtype=torch.float32, device=y.device)
            self._kernel(x, delta, batch)
        else:
            delta = self._gather(x, batch) if batch.strategy == "gather" else self._grouped(x, batch)
        if delta is None:
            return y
        if gain is None:
            return (y.float() + delta).to(y.dtype)
        if self.bias is None:
            return (gain * (y.float() + delta)).to(y.dtype)
        return (gain * ((y - self.bias).float() + delta)).to(y.dtype) + self.bias

    def _row_gain(self, batch: AdapterBatch) -> torch.Tensor | None:
        first = batch.slots[:, 0]
        if not any(self.dora[s] for s, _, _ in batch.groups()):
            return None
        return torch.where((first >= 0)[:, None], self.gain[first.clamp(min=0)], 1.0)[:, None, :]  # [B, 1, out]

    def _kernel(self, x: torch.Tensor, out: torch.Tensor, batch: AdapterBatch) -> None:
        s = x.shape[1]
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        out2 = out.view(-1, out.shape[-1])
        for k in range(batch.slots.shape[1]):
            items, w = batch.per_token(k, s)
            bgmv(x2, out2, items, w, self.scale, self.A, self.B)

    def _ranges_in_place(self, x: torch.Tensor, y: torch.Tensor, batch: AdapterBatch) -> bool:
        """Rows grouped by adapter in contiguous runs (packed prompts sorted by adapter, or one adapter
        for all): y[run] += scale · (x[run] A) B, one GEMM pair per run adding into the base output, no
        copies. False when the batch is not laid out that way."""
        runs = batch.runs()
        if runs is None:
            return False
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        s = x.shape[1]
        for slot, a, b in runs:
            if self.active[slot]:
                h = x2[a * s : b * s].float() @ self._a(slot)
                y2[a * s : b * s].addmm_(h, self.B[slot].float(), alpha=self.scales[slot])
        return True

    def _gather(self, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor | None:
        xf = x.float()
        delta = None
        for k in range(batch.slots.shape[1]):
            idx = batch.slots[:, k]
            use = (idx >= 0).to(torch.float32)
            if batch.weights is not None:
                use = use * batch.weights[:, k]
            idx = idx.clamp(min=0)
            use = use * self.scale[idx]
            a = self.A[idx].float().transpose(1, 2).contiguous()  # [B, in, r]: bmm is slow on the view
            d = torch.bmm(torch.bmm(xf, a), self.B[idx].float()) * use[:, None, None]
            delta = d if delta is None else delta + d
        return delta

    def _grouped(self, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor | None:
        groups = [g for g in batch.groups() if self.active[g[0]]]
        if not groups:
            return None
        n = x.shape[0]
        if len(groups) == 1 and groups[0][2] is None and len(groups[0][1]) == n:
            slot = groups[0][0]  # every row, one adapter: no indexing at all
            return (x.float() @ self._a(slot)) @ self._b(slot)
        delta = torch.zeros(*x.shape[:-1], self.B.shape[2], dtype=torch.float32, device=x.device)
        for slot, rows, w in groups:
            d = (x[rows].float() @ self._a(slot)) @ self._b(slot)  # [n, S, out]
            if w is not None:
                d = d * w[:, None, None]
            delta.index_add_(0, rows, d)
        return delta

    def _reference(self, x: torch.Tensor, y: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        # One row at a time with the dense merged weight: the definition the fast paths must meet.
        rows = []
        w = base_weight(self.base).float()
        weights = batch.weights if batch.weights is not None else torch.ones(batch.slots.shape)
        for b in range(x.shape[0]):
            pairs = [(s, float(c)) for s, c in zip(batch.slots[b].tolist(), weights[b], strict=True) if s >= 0]
            if not pairs:
                rows.append(y[b])
                continue
            merged = w.clone()
            for s, c in pairs:
                merged += c * (self._a(s) @ self._b(s)).T
            merged = self.gain[pairs[0][0]][:, None] * merged
            bias = None if self.bias is None else self.bias.float()
            rows.append(F.linear(x[b].float(), merged, bias).to(y.dtype))
        return torch.stack(rows)
