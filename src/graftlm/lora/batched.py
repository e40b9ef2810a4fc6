"""Many adapters in one forward pass: each row of a batch uses its own adapter, or none.

Adapters are loaded into numbered slots; every projection keeps its slots stacked (Punica / S-LoRA):
  A      [n_slots, r_max, in]   zero-padded to r_max, so adapters of any rank share one stack
  B      [n_slots, out, r_max]  with the adapter's scale folded in
  gain   [n_slots, out]         DoRA's m / ‖W + s·BA‖ per output row; 1 for plain LoRA
A forward takes `AdapterBatch.slots` [B] (-1 = base model) and adds, per row b,
  y_b = gain[s_b] ⊙ (W x_b + B[s_b] A[s_b] x_b) + bias.
Two ways to compute it: gather each row's matrices and use batched matmuls (`gather`), or loop over
the distinct adapters in the batch (`grouped`); `auto` picks by how many rows share each adapter.
`reference` is the plain per-row loop both are tested against; `benchmarks/multi_lora.py` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.lora.layer import base_weight

STRATEGIES = ("auto", "gather", "grouped", "reference")
# Measured here (benchmarks/multi_lora.py, batch 32): grouping wins while few adapters share the batch,
# gathering once most rows differ. `auto` groups when adapters average at least this many rows each.
GROUP_WHEN_ROWS_PER_ADAPTER = 4


@dataclass
class AdapterBatch:
    slots: torch.Tensor  # [B] long, slot per row, -1 = no adapter
    strategy: str = "auto"
    _groups: list[tuple[int, torch.Tensor]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "auto":
            rows = int((self.slots >= 0).sum())
            many_rows_each = len(self.groups()) * GROUP_WHEN_ROWS_PER_ADAPTER <= rows
            self.strategy = "grouped" if many_rows_each else "gather"

    @classmethod
    def of(cls, slots: list[int], strategy: str = "auto", device: torch.device | str = "cpu") -> AdapterBatch:
        return cls(torch.tensor(slots, dtype=torch.long, device=device), strategy)

    @property
    def any(self) -> bool:
        return bool((self.slots >= 0).any())

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, row indices) for every adapter used in the batch, computed once per forward."""
        if self._groups is None:
            self._groups = [
                (int(s), (self.slots == s).nonzero().squeeze(1)) for s in self.slots.unique().tolist() if s >= 0
            ]
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
        self.register_buffer("A", torch.zeros(n_slots, r_max, in_f, **kw), persistent=False)
        self.register_buffer("B", torch.zeros(n_slots, out_f, r_max, **kw), persistent=False)
        self.register_buffer("gain", torch.ones(n_slots, out_f, **kw), persistent=False)
        self.active = [False] * n_slots  # does slot s hold weights for this projection?

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def set_slot(
        self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor | None = None
    ) -> None:
        r = A.shape[0]
        if r > self.r_max:
            raise ValueError(f"adapter rank {r} exceeds the slots' maximum rank {self.r_max}")
        self.clear_slot(slot)
        self.A[slot, :r] = A.float()
        self.B[slot, :, :r] = B.float() * scale
        if magnitude is not None:
            w = base_weight(self.base).float() + self.B[slot, :, :r] @ self.A[slot, :r]
            self.gain[slot] = magnitude.float() / torch.linalg.norm(w, dim=1)
        self.active[slot] = True

    def clear_slot(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.gain[slot].fill_(1.0)
        self.active[slot] = False

    def forward(self, x: torch.Tensor, batch: AdapterBatch | None = None) -> torch.Tensor:
        y = self.base(x)  # x: [B, S, in] -> y: [B, S, out]
        if batch is None:
            return y
        if batch.strategy == "gather":
            return self._gather(x, y, batch.slots)
        if batch.strategy == "grouped":
            return self._grouped(x, y, batch)
        return self._reference(x, y, batch.slots)

    def _combine(self, y: torch.Tensor, delta: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        # y, delta: [..., out]; gain broadcastable to them
        if self.bias is None:
            return (gain * (y.float() + delta)).to(y.dtype)
        return (gain * (y - self.bias).float() + gain * delta).to(y.dtype) + self.bias

    def _gather(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        idx = slots.clamp(min=0)
        use = (slots >= 0).to(torch.float32)[:, None, None]  # [B, 1, 1]
        h = torch.bmm(x.float(), self.A[idx].transpose(1, 2))  # [B, S, r_max]
        delta = torch.bmm(h, self.B[idx].transpose(1, 2)) * use  # [B, S, out]
        gain = torch.where(use[:, :, 0] > 0, self.gain[idx], 1.0)[:, None, :]  # [B, 1, out]
        return self._combine(y, delta, gain)

    def _grouped(self, x: torch.Tensor, y: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        out = y.clone()
        for slot, rows in batch.groups():
            if not self.active[slot]:
                continue
            xs = x[rows].float()  # [n, S, in]
            delta = F.linear(F.linear(xs, self.A[slot]), self.B[slot])  # [n, S, out]
            out[rows] = self._combine(y[rows], delta, self.gain[slot])
        return out

    def _reference(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # One row at a time with the dense merged weight: the definition the fast paths must meet.
        rows = []
        w = base_weight(self.base).float()
        for b, s in enumerate(slots.tolist()):
            if s < 0:
                rows.append(y[b])
                continue
            merged = self.gain[s][:, None] * (w + self.B[s] @ self.A[s])
            bias = None if self.bias is None else self.bias.float()
            rows.append(F.linear(x[b].float(), merged, bias).to(y.dtype))
        return torch.stack(rows)
