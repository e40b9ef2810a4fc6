"""A palettized weight: bit-packed indices into small lookup tables, one table per group of output rows.

This is Apple's and coremltools' grouped-channel palettization: the [out, in] weight's rows are cut into
groups of `group_size` output channels, each group gets a table of 2^bits values found by k-means over its
weights (optionally weighted by their sensitivity), and every weight is stored as the index of its
nearest table entry. Tables are stored in float16.

With `row_scale` each output row is first divided by its largest magnitude, and that scale (float16) is
kept: W[r] = scale[r] · table[group(r)][index]. Rows of different sizes then share a table without the
small ones losing all resolution (coremltools' per-channel scale); it costs 16 bits per row.

With `in_scales` each input column j is divided by s_j before clustering and multiplied back after the
lookup: W[r, j] = scale[r] · table[group(r)][index] · s_j. A table shared by a whole row group then puts
its entries where the columns that matter are (AWQ's activation-aware scaling, Lin et al., 2024, kept as
a float16 vector instead of folded into the previous layer, so adapters trained on the uncompressed
model see the same inputs); it costs 16 bits per input column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graftlm.quant.kmeans import kmeans, nearest
from graftlm.quant.pack import check_bits, pack, row_bytes, unpack

TABLE_DTYPE = torch.float16


@dataclass(frozen=True)
class Palette:
    packed: torch.Tensor  # [out, row_bytes(in, bits)] uint8
    tables: torch.Tensor  # [groups, 2^bits] float16
    bits: int
    group_size: int  # output rows per table; the whole tensor shares one table when it is 0
    in_features: int
    scales: torch.Tensor | None = None  # [out] float16, or None: no row scales
    in_scales: torch.Tensor | None = None  # [in] float16, or None: no input-column scales

    def __post_init__(self) -> None:
        check_bits(self.bits)
        out = self.packed.shape[0]
        if self.packed.dtype != torch.uint8 or self.packed.shape[1] != row_bytes(self.in_features, self.bits):
            raise ValueError(
                f"packed indices of a [{out}, {self.in_features}] {self.bits}-bit weight must be uint8 "
                f"[{out}, {row_bytes(self.in_features, self.bits)}], got {self.packed.dtype} {list(self.packed.shape)}"
            )
        want = (n_groups(out, self.group_size), 1 << self.bits)
        if tuple(self.tables.shape) != want:
            raise ValueError(
                f"a {self.bits}-bit palette of {out} rows in groups of {self.group_size} has tables "
                f"{list(want)}, got {list(self.tables.shape)}"
            )
        if self.scales is not None and tuple(self.scales.shape) != (out,):
            raise ValueError(f"row scales of a {out}-row palette have shape [{out}], not {list(self.scales.shape)}")
        if self.in_scales is not None and tuple(self.in_scales.shape) != (self.in_features,):
            raise ValueError(
                f"input scales of a palette with {self.in_features} inputs have shape [{self.in_features}], "
                f"not {list(self.in_scales.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.in_features

    @property
    def storage_bits(self) -> int:
        """Bits this weight takes on disk and in memory: packed indices, tables, row and input scales."""
        scales = sum(0 if t is None else t.numel() * 16 for t in (self.scales, self.in_scales))
        return self.packed.numel() * 8 + self.tables.numel() * 16 + scales

    def indices(self) -> torch.Tensor:
        """[out, in] int64."""
        return unpack(self.packed, self.bits, self.shape[1])

    def row_groups(self) -> torch.Tensor:
        """The table of every output row: [out] int64."""
        return row_groups(self.shape[0], self.group_size, self.packed.device)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized [out, in] weight: each index looked up in its row's table (reference path)."""
        w = self.tables.to(dtype)[self.row_groups()[:, None], self.indices()]
        if self.scales is not None:
            w = w * self.scales.to(dtype)[:, None]
        return w if self.in_scales is None else w * self.in_scales.to(dtype)[None, :]

    @classmethod
    def of(
        cls,
        weight: torch.Tensor,
        bits: int,
        group_size: int = 16,
        importance: torch.Tensor | None = None,
        row_scale: bool = False,
        in_scales: torch.Tensor | None = None,
    ) -> Palette:
        """Palettize an [out, in] weight; `importance` [out, in] or [in] weights each value's error;
        `in_scales` [in] (positive, kept in float16) divides the columns before clustering."""
        check_bits(bits)
        if group_size < 0:
            raise ValueError(f"group size must be 0 (one table per tensor) or positive, not {group_size}")
        w = weight.detach().float()
        out, inn = w.shape
        imp = None if importance is None else importance.float().expand(out, inn)
        if in_scales is not None:
            in_scales = in_scales.detach().to(TABLE_DTYPE)
            if tuple(in_scales.shape) != (inn,) or not bool((in_scales.float() > 0).all()):
                raise ValueError(f"input scales of a [{out}, {inn}] weight must be {inn} positive values")
            s_in = in_scales.float().to(w.device)[None, :]
            w = w / s_in
            imp = None if imp is None else imp * s_in.square()  # an error in w/s costs s² in w
        scales = None
        if row_scale:
            scales = w.abs().amax(1).clamp_min(1e-6).to(TABLE_DTYPE)
            s = scales.float()[:, None]
            w = w / s
            imp = None if imp is None else imp * s.square()  # an error in w/s costs s² in w
        k = 1 << bits
        count_groups = n_groups(out, group_size)
        tables = torch.empty(count_groups, k, dtype=TABLE_DTYPE, device=w.device)
        idx = torch.empty(out, inn, dtype=torch.int64, device=w.device)
        size = out if group_size == 0 else group_size
        full = out // size  # groups of exactly `size` rows run together; a shorter last group on its own
        for first, count in ((0, full), (full, count_groups - full)):
            if count == 0:
                continue
            rows = slice(first * size, min(out, (first + count) * size))
            vals = w[rows].reshape(count, -1)
            cents, _ = kmeans(vals, k, None if imp is None else imp[rows].reshape(count, -1))
            stored = cents.to(TABLE_DTYPE).float().sort(dim=1).values
            tables[first : first + count] = stored.to(TABLE_DTYPE)
            # indices of the nearest *stored* (float16) entry, so a lookup gives the best value there is
            idx[rows] = nearest(vals, stored).view(-1, inn)
        return cls(pack(idx, bits), tables, bits, group_size, inn, scales, in_scales)


def row_groups(out: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    rows = torch.arange(out, device=device)
    return torch.zeros_like(rows) if group_size == 0 else rows // group_size


def n_groups(out: int, group_size: int) -> int:
    return 1 if group_size == 0 else (out + group_size - 1) // group_size
