"""Adapter slots on a model: every projection made multi-adapter, adapters loaded into numbered slots.

`dtype` is how the slots hold A and B: float32 keeps any adapter exact, bfloat16 (the serving default)
halves memory and the bytes each decode step reads, and is exact for adapters stored in bf16.
"""

from __future__ import annotations

import torch

from graftlm.lora.batched import MultiLoRALinear
from graftlm.lora.config import AdapterError
from graftlm.lora.layer import base_shape
from graftlm.lora.model import PEFT_PREFIX
from graftlm.lora.peft_io import Adapter, check_fits
from graftlm.model.llama import Llama
from graftlm.model.modules import module_path, parent, projections


class AdapterSlots:
    """`n_slots` adapters of rank at most `r_max` resident at once; rows of a batch pick a slot each."""

    def __init__(self, model: Llama, n_slots: int, r_max: int = 16, dtype: torch.dtype = torch.float32):
        if n_slots < 1 or r_max < 1:
            raise ValueError(f"need at least one slot of rank >= 1, got {n_slots} slots of rank {r_max}")
        self.model, self.n_slots, self.r_max = model, n_slots, r_max
        model.fingerprint()  # of the base weights, before wrapping
        self.layers: dict[str, MultiLoRALinear] = {}
        for i, t, proj in list(projections(model)):
            if isinstance(proj, MultiLoRALinear):
                raise AdapterError("this model already has adapter slots")
            layer = MultiLoRALinear(proj, n_slots, r_max, dtype)
            setattr(parent(model, i, t), t, layer)
            self.layers[module_path(i, t)] = layer
        self.held: list[str | None] = [None] * n_slots  # adapter name per slot

    @staticmethod
    def slot_bytes(model: Llama, r_max: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes one slot takes (before any is allocated): A and B at rank r_max in `dtype`, plus the
        float32 scale and DoRA gain, over every projection."""
        size = torch.finfo(dtype).bits // 8
        total = 0
        for _, _, proj in projections(model):
            out_f, in_f = base_shape(getattr(proj, "base", proj))
            total += size * r_max * (in_f + out_f) + 4 * (out_f + 1)
        return total

    def load(self, slot: int, adapter: Adapter, force: bool = False, checked: bool = False) -> None:
        """Put `adapter` into `slot` (replacing what was there), after checking it fits the base
        (unless the caller has just `checked` it)."""
        self._check_slot(slot)
        if not checked:
            check_fits(adapter, self.model, force)
        modules = adapter.modules()
        for path, layer in self.layers.items():
            if path not in modules:
                layer.clear_slot(slot)
                continue
            t = adapter.tensors
            key = f"{PEFT_PREFIX}{path}"
            r, _ = adapter.config.rank_alpha(path)
            if r > self.r_max:
                raise AdapterError(f"adapter {adapter.name} has rank {r} at {path}; slots hold rank <= {self.r_max}")
            layer.set_slot(
                slot,
                t[f"{key}.lora_A.weight"],
                t[f"{key}.lora_B.weight"],
                adapter.config.scale(path),
                t.get(f"{key}.lora_magnitude_vector"),
            )
        self.held[slot] = adapter.name

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.held[slot] = None

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} out of range (0..{self.n_slots - 1})")

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for layer in self.layers.values() for b in layer.buffers())
