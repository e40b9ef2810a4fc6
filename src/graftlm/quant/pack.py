"""Bit-packing of palette indices: each row of indices becomes its own little-endian bit stream.

Index j of a row occupies bits [j·b, (j+1)·b) of that row's bytes (bit 0 = the lowest bit of byte 0),
so any row unpacks on its own and widths that do not divide 8 (3 and 6 bits) waste at most the last
byte of a row.
"""

from __future__ import annotations

import torch

BITS = (2, 3, 4, 6, 8)


def row_bytes(n: int, bits: int) -> int:
    """Bytes that one row of `n` indices of `bits` bits takes."""
    return (n * bits + 7) // 8


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"palettes have {', '.join(map(str, BITS))} bits per index, not {bits}")


def pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """indices [R, n] integers in [0, 2^bits) -> [R, row_bytes(n, bits)] uint8."""
    check_bits(bits)
    rows, n = indices.shape
    idx = indices.to(torch.int32)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 1 << bits):
        raise ValueError(f"indices must lie in [0, {1 << bits}) for {bits}-bit packing")
    shifts = torch.arange(bits, dtype=torch.int32, device=idx.device)
    stream = ((idx[:, :, None] >> shifts) & 1).to(torch.uint8).reshape(rows, n * bits)  # [R, n·b] bits
    pad = row_bytes(n, bits) * 8 - n * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, dtype=torch.int32, device=idx.device)).to(torch.uint8)
    return (stream.view(rows, -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """[R, row_bytes(n, bits)] uint8 -> [R, n] int64 indices (the inverse of `pack`)."""
    check_bits(bits)
    rows = packed.shape[0]
    if packed.shape[1] != row_bytes(n, bits):
        raise ValueError(f"a row of {n} {bits}-bit indices takes {row_bytes(n, bits)} bytes, got {packed.shape[1]}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, :, None] >> shifts) & 1).reshape(rows, -1)[:, : n * bits]  # [R, n·b] bits
    weights = 1 << torch.arange(bits, dtype=torch.int64, device=packed.device)
    return (stream.view(rows, n, bits).to(torch.int64) * weights).sum(-1)
