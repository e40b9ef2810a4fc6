"""A preallocated key/value cache: one [B, KV, T, D] buffer per layer, written in place."""

from __future__ import annotations

import torch

from graftlm.model.config import LlamaConfig


class KVCache:
    def __init__(
        self,
        config: LlamaConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        zeroed: bool = False,
    ):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        make = torch.zeros if zeroed else torch.empty
        self.k = make(shape, dtype=dtype, device=device)
        self.v = make(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, KV, S, D] at [start, start+S) and return the layer's keys and values so far."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise IndexError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class RowKVCache(KVCache):
    """The serving engine's cache: `rows` sequences of up to `max_len` positions each, preallocated once.

    A sequence owns one row from admission to finish; rows are reused, so memory stays bounded. The
    engine keeps decoding rows packed at 0..n-1 (see `move`), so a decode step reads plain views.
    Zeroed at the start: a row's unwritten positions are masked, but a masked NaN would still poison
    the attention sum.
    """

    def __init__(
        self,
        config: LlamaConfig,
        rows: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__(config, rows, max_len, dtype, device, zeroed=True)
        self.rows = rows

    def chunk(self, row0: int, n: int) -> KVCache:
        """Rows row0..row0+n-1 as a plain cache: for prefill, where the rows share one start offset."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, row0 : row0 + n], self.v[:, row0 : row0 + n]
        view.max_len = self.max_len
        return view

    def packed(self, row0: int, lengths: list[int]) -> PackedView:
        """Prompts packed into one sequence [1, sum(lengths)], the i-th going to row row0 + i at 0."""
        return PackedView(self, row0, lengths)

    def decode(self, positions: torch.Tensor) -> DecodeView:
        """Rows 0..n-1 each writing S tokens at their own positions (`positions` [n, S] long: the last token,
        and in a speculative step its drafts after it)."""
        return DecodeView(self, positions)

    def clear(self, row: int, length: int) -> None:
        """Zero a row's first `length` positions (after it held NaN: masked stale positions must be finite)."""
        self.k[:, row, :, :length] = 0
        self.v[:, row, :, :length] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a row's first `length` positions to another row (packing rows after one finishes)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class DecodeView:
    def __init__(self, cache: RowKVCache, positions: torch.Tensor):
        self.cache = cache
        self.n = positions.shape[0]
        self.rows = torch.arange(self.n, device=positions.device)
        self.positions = positions
        self.end = int(positions.max()) + 1

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [n, KV, S, D] at each row's positions; return keys and values [n, KV, end, D]."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        # index [n, S] on rows and positions: the values go as [n, S, KV, D]
        ck[self.rows[:, None], :, self.positions] = k.transpose(1, 2)
        cv[self.rows[:, None], :, self.positions] = v.transpose(1, 2)
        return ck[: self.n, :, : self.end], cv[: self.n, :, : self.end]


class PackedView:
    def __init__(self, cache: RowKVCache, row0: int, lengths: list[int]):
        self.cache, self.row0, self.lengths = cache, row0, lengths

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy each prompt's keys and values [1, KV, T, D] to its own row; attention uses them packed."""
        off = 0
        for i, n in enumerate(self.lengths):
            self.cache.k[layer, self.row0 + i, :, :n] = k[0, :, off : off + n]
            self.cache.v[layer, self.row0 + i, :, :n] = v[0, :, off : off + n]
            off += n
        return k, v
