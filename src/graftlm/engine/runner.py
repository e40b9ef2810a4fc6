"""Runs the model for the scheduler's steps: builds each step's tensors (tokens, positions, masks, the
adapter of every row) and returns the logits of the rows that got a new token."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graftlm.engine.kv_cache import RowKVCache
from graftlm.engine.request import Request
from graftlm.engine.scheduler import Prefill
from graftlm.lora.batched import AdapterBatch
from graftlm.model.llama import Llama


class ModelRunner:
    def __init__(self, model: Llama, kv: RowKVCache, strategy: str):
        self.model, self.kv, self.strategy = model, kv, strategy
        self.device = model.device

    def decode(self, reqs: Sequence[Request]) -> torch.Tensor:
        """One token for each decoding row (rows 0..n-1); logits [n, V]."""
        logits = self.verify(reqs, [()] * len(reqs))[:, -1]
        for r in reqs:
            r.filled += 1
        return logits

    def verify(self, reqs: Sequence[Request], drafts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Each row's last token and its drafts in one forward (rows padded to the longest, the padding's
        keys and values written past the row's tokens, where a later step overwrites them before any
        query sees them); logits [n, S, V], position j predicting what follows draft[:j]. Rows' `filled`
        is left to the caller, which knows how many drafts were accepted (`decode`: no drafts, S = 1)."""
        width = 1 + max(len(d) for d in drafts)
        offsets = torch.arange(width, device=self.device)
        pos = torch.tensor([r.filled for r in reqs], device=self.device)[:, None] + offsets  # [n, S]
        view = self.kv.decode(pos)
        mask = (torch.arange(view.end, device=self.device)[None, None, :] <= pos[:, :, None])[:, None]
        rows = [[r.last_token, *d] + [r.last_token] * (width - 1 - len(d)) for r, d in zip(reqs, drafts, strict=True)]
        tokens = torch.tensor(rows, device=self.device)  # [n, S]
        adapters = self._adapters(reqs, width)
        return self.model(tokens, pos, view, 0, adapters=adapters, attn_mask=mask)

    def prefill(self, step: Prefill) -> torch.Tensor | None:
        """Take in `step`'s prompt tokens; logits [k, V] of the k prompts it finished (None if none)."""
        return self._packed(step.reqs) if step.packed else self._chunk(step.reqs[0], step.start, step.length)

    def _packed(self, group: list[Request]) -> torch.Tensor:
        lengths = [len(r.prompt) for r in group]
        tokens = torch.tensor([[t for r in group for t in r.prompt]], device=self.device)  # [1, T]
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])[None]  # [1, T]
        counts = torch.tensor(lengths, device=self.device)
        segment = torch.repeat_interleave(torch.arange(len(group), device=self.device), counts)  # [T]
        # block-diagonal causal mask: each prompt sees only itself
        mask = (segment[:, None] == segment[None, :]) & (positions[0][None, :] <= positions[0][:, None])
        view = self.kv.packed(group[0].row, lengths)
        adapters = self._adapters([r for r, n in zip(group, lengths, strict=True) for _ in range(n)])
        if adapters is not None:
            adapters.token_level = True
        h = self.model.hidden(tokens, positions, view, 0, adapters=adapters, attn_mask=mask[None, None])
        for r in group:
            r.filled = len(r.prompt)
        return self.model.logits(h[0, counts.cumsum(0) - 1])

    def _chunk(self, req: Request, start: int, length: int) -> torch.Tensor | None:
        """The next chunk of a prompt, attending to the chunks before it."""
        tokens = torch.tensor([req.prompt[start : start + length]], device=self.device)  # [1, S]
        positions = torch.arange(start, start + length, device=self.device)[None]
        adapters = self._adapters([req], length)
        h = self.model.hidden(tokens, positions, self.kv.chunk(req.row, 1), start, adapters=adapters)
        req.filled += length
        return self.model.logits(h[0, -1:]) if req.filled == len(req.prompt) else None

    def _adapters(self, reqs: Sequence[Request], seq_len: int = 1) -> AdapterBatch | None:
        """The adapter slot (and weight) of every row, or None when no row has one."""
        rows = [[(e.slot, w) for e, (_, w) in zip(r.entries, r.adapters, strict=True)] for r in reqs]
        if not any(rows):
            return None
        return AdapterBatch.of(rows, self.strategy, self.device, seq_len)


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Which rows of logits [n, V] are all finite."""
    return torch.isfinite(logits).all(-1).tolist()


def checked_picks(logits: torch.Tensor) -> tuple[list[bool], list[int]]:
    """Which rows of logits [n, V] are all finite, and each row's greedy pick, read back in one transfer
    (one device sync a step on a GPU instead of two)."""
    both = torch.stack([torch.isfinite(logits).all(-1).long(), logits.argmax(-1)]).tolist()
    return [bool(f) for f in both[0]], both[1]
