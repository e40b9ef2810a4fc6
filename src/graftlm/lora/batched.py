"""Many adapters in one forward pass: each row of a batch uses its own adapter, a weighted mix, or none.

Adapters are loaded into numbered slots; every projection keeps its slots stacked (Punica / S-LoRA):
  A      [n_slots, in, r_max]   A transposed, zero-padded to r_max so adapters of any rank share one stack
  B      [n_slots, r_max, out]  B transposed, with the adapter's scale folded in
  gain   [n_slots, out]         DoRA's m / ‖W + s·BA‖ per output row; 1 for plain LoRA
The transposed layout matters: batched matmuls over gathered [in, r] blocks run about 8x faster here
than over transposed views of [r, in] blocks.

A forward takes `AdapterBatch.slots` [B, K] (-1 = nothing) and `weights` [B, K]; row b gets
  y_b = gain[s_b0] ⊙ (W x_b + Σ_k w_bk · B[s_bk] A[s_bk] x_b) + bias,
so K > 1 composes adapters at serve time (Apple's stacked adapters) without writing a merged copy
(gain is 1 for composed rows: DoRA adapters are not composed). Two ways to compute it: gather each
row's matrices and use batched matmuls (`gather`), or loop over the distinct adapters in the batch
(`grouped`); `auto` picks by a cost rule measured here. `reference` is the plain per-row loop both are
tested against; `benchmarks/multi_lora.py` measures them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.lora.layer import base_weight

STRATEGIES = ("auto", "gather", "grouped", "reference")
# Measured here (2 threads, 135M model, rank 16, decode): gathering costs about 1.6 ms per row and step,
# looping about 2.5 ms per distinct adapter and step. `auto` loops while distinct adapters are at most
# this fraction of the adapter rows.
GROUP_WHEN_DISTINCT_PER_ROW = 0.6

RowAdapters = int | Sequence[tuple[int, float]]  # a slot (-1 = none), or (slot, weight) pairs


@dataclass
class AdapterBatch:
    slots: torch.Tensor  # [B, K] long, slot per row and column, -1 = nothing
    weights: torch.Tensor | None = None  # [B, K] float32; None = all 1
    strategy: str = "auto"
    _groups: list[tuple[int, torch.Tensor, torch.Tensor | None]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.slots.dim() == 1:
            self.slots = self.slots[:, None]
        if self.weights is not None and self.weights.dim() == 1:
            self.weights = self.weights[:, None]
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "auto":
            pairs = int((self.slots >= 0).sum())
            few = len(self.groups()) <= GROUP_WHEN_DISTINCT_PER_ROW * pairs
            self.strategy = "grouped" if few else "gather"

    @classmethod
    def of(
        cls, rows: Sequence[RowAdapters], strategy: str = "auto", device: torch.device | str = "cpu"
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
        )

    @property
    def any(self) -> bool:
        return bool((self.slots >= 0).any())

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

    def __init__(self, base: nn.Module, n_slots: int, r_max: int):
        super().__init__()
        w = base_weight(base)
        out_f, in_f = w.shape
        self.base = base
        self.r_max = r_max
        kw = {"device": w.device, "dtype": torch.float32}
        self.register_buffer("A", torch.zeros(n_slots, in_f, r_max, **kw), persistent=False)
        self.register_buffer("B", torch.zeros(n_slots, r_max, out_f, **kw), persistent=False)
        self.register_buffer("gain", torch.ones(n_slots, out_f, **kw), persistent=False)
        self.active = [False] * n_slots  # does slot s hold weights for this projection?
        self.dora = [False] * n_slots  # does slot s rescale rows (gain != 1)?

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
        # write in place, converting from the stored 16 bits as we go: a cold load is two passes over the
        # adapter, not five (this is most of the "disk to usable" time)
        self.A[slot, :, :r].copy_(A.T)
        self.B[slot, :r].copy_(B.T)
        if r < self.r_max:
            self.A[slot, :, r:].zero_()
            self.B[slot, r:].zero_()
        if scale != 1.0:
            self.B[slot, :r].mul_(scale)
        if magnitude is not None:
            w = base_weight(self.base).float() + (self.A[slot, :, :r] @ self.B[slot, :r]).T
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

    def forward(self, x: torch.Tensor, batch: AdapterBatch | None = None) -> torch.Tensor:
        y = self.base(x)  # x: [B, S, in] -> y: [B, S, out]
        if batch is None:
            return y
        if batch.strategy == "reference":
            return self._reference(x, y, batch)
        delta = self._gather(x, batch) if batch.strategy == "gather" else self._grouped(x, batch)
        if delta is None:
            return y
        gain = self._row_gain(batch)
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

    def _gather(self, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor | None:
        xf = x.float()
        delta = None
        for k in range(batch.slots.shape[1]):
            idx = batch.slots[:, k]
            use = (idx >= 0).to(torch.float32)
            if batch.weights is not None:
                use = use * batch.weights[:, k]
            idx = idx.clamp(min=0)
            d = torch.bmm(torch.bmm(xf, self.A[idx]), self.B[idx]) * use[:, None, None]  # [B, S, out]
            delta = d if delta is None else delta + d
        return delta

    def _grouped(self, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor | None:
        groups = [g for g in batch.groups() if self.active[g[0]]]
        if not groups:
            return None
        n = x.shape[0]
        if len(groups) == 1 and groups[0][2] is None and len(groups[0][1]) == n:
            slot = groups[0][0]  # every row, one adapter: no indexing at all
            return (x.float() @ self.A[slot]) @ self.B[slot]
        delta = torch.zeros(*x.shape[:-1], self.B.shape[2], dtype=torch.float32, device=x.device)
        for slot, rows, w in groups:
            d = (x[rows].float() @ self.A[slot]) @ self.B[slot]  # [n, S, out]
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
                merged += c * (self.A[s] @ self.B[s]).T
            merged = self.gain[pairs[0][0]][:, None] * merged
            bias = None if self.bias is None else self.bias.float()
            rows.append(F.linear(x[b].float(), merged, bias).to(y.dtype))
        return torch.stack(rows)
