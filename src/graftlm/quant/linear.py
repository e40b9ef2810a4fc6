"""Modules that compute with palettized weights: a linear layer and an embedding that can share it.

They hold the packed indices and float16 tables as buffers (what is on disk is what is in memory) and
dequantize on the fly: one row at a time inside the fused kernel for a single input row (decoding), the
whole weight once per call for more rows (prefill, training), then the BLAS matmul. Their call is the
call of the module they replace, so LoRA wraps them as it wraps `nn.Linear` (`base_weight` uses
`dense_weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.quant import lut
from graftlm.quant.pack import row_bytes, unpack
from graftlm.quant.palette import Palette, n_groups, row_groups


class KernelTables:
    """What the fused kernels read besides the indices, made once from a layer's float16 buffers: float32
    tables and scales, and the tables as int8 with one scale each for the integer products. Remade when a
    buffer changes (tuning writes them in place)."""

    def __init__(self, layer: PalettizedLinear):
        self.key = KernelTables.key_of(layer)
        self.tables = layer.tables.float().contiguous()
        self.scales = None if layer.scales is None else layer.scales.float().contiguous()
        self.in_scales = None if layer.in_scales is None else layer.in_scales.float().contiguous()
        self.integer: lut.Q8Linear | None = None
        if layer.integer_products and lut.q8_usable(layer.bits, layer.in_features) and layer.packed.is_contiguous():
            qtables, qscales = lut.q8_tables(self.tables)
            bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
            self.integer = lut.Q8Linear(
                layer.packed, qtables, qscales, self.scales, self.in_scales, bias,
                layer.bits, layer.group_size, layer.in_features,
            )  # fmt: skip

    @staticmethod
    def key_of(layer: PalettizedLinear) -> tuple[bool, tuple[torch.Tensor | None, ...], tuple[int | None, ...]]:
        """The buffers themselves (compared by identity: a replaced buffer is a new object) and their
        versions (an in-place write bumps it)."""
        bufs = (layer.packed, layer.tables, layer.scales, layer.in_scales, layer.bias)
        return layer.integer_products, bufs, tuple(None if t is None else t._version for t in bufs)

    def fits(self, layer: PalettizedLinear) -> bool:
        """Whether these copies were made from the layer's current buffers."""
        integer, bufs, versions = KernelTables.key_of(layer)
        return (
            integer == self.key[0]
            and versions == self.key[2]
            and all(a is b for a, b in zip(bufs, self.key[1], strict=True))
        )


class PalettizedLinear(nn.Module):
    # Decoding's few-row products take the integer kernel (int8 tables, activations quantized to 8 bits
    # per block of 32: about 0.7% relative error per product, as llama.cpp's quantized types); False keeps
    # the float kernel, whose products equal the dequantized weight's to float32 rounding.
    integer_products = True

    def __init__(self, palette: Palette, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.group_size = palette.bits, palette.group_size
        self.out_features, self.in_features = palette.shape
        self.register_buffer("packed", palette.packed)  # [out, row_bytes] uint8
        self.register_buffer("tables", palette.tables)  # [groups, 2^bits] float16
        self.scales: torch.Tensor | None
        self.register_buffer("scales", palette.scales)  # [out] float16, or None (no row scales)
        self.in_scales: torch.Tensor | None
        self.register_buffer("in_scales", palette.in_scales)  # [in] float16, or None (no input scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._kernel_tables: KernelTables | None = None

    def kernel_tables(self) -> KernelTables:
        """The fused kernels' copies of the tables and scales (see `KernelTables`)."""
        k = self._kernel_tables
        if k is None or not k.fits(self):
            k = self._kernel_tables = KernelTables(self)
        return k

    @classmethod
    def empty(
        cls,
        shape: tuple[int, int],
        bits: int,
        group_size: int,
        row_scale: bool = False,
        bias: bool = False,
        device: str = "meta",
        in_scale: bool = False,
    ) -> PalettizedLinear:
        """A layer of the right shapes to load a state dict into."""
        out, inn = shape
        packed = torch.empty(out, row_bytes(inn, bits), dtype=torch.uint8, device=device)
        tables = torch.empty(n_groups(out, group_size), 1 << bits, dtype=torch.float16, device=device)
        scales = torch.empty(out, dtype=torch.float16, device=device) if row_scale else None
        in_scales = torch.empty(inn, dtype=torch.float16, device=device) if in_scale else None
        palette = Palette(packed, tables, bits, group_size, inn, scales, in_scales)
        return cls(palette, torch.empty(out, device=device) if bias else None)

    @property
    def palette(self) -> Palette:
        return Palette(
            self.packed, self.tables, self.bits, self.group_size, self.in_features, self.scales, self.in_scales
        )

    @property
    def num_weights(self) -> int:
        return self.out_features * self.in_features

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.float32 and lut.usable(x, self.packed)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` (any shape) -> [*ids.shape, in] float32: the embedding lookup."""
        flat = ids.reshape(-1)
        if lut.usable(self.packed, flat):
            k = self.kernel_tables()
            out = lut.dequant(self.packed, k.tables, k.scales, self.bits, self.group_size, self.in_features, flat)
            if k.in_scales is not None:
                out.mul_(k.in_scales)
        else:
            idx = unpack(self.packed[flat], self.bits, self.in_features)  # [n, in]
            groups = row_groups(self.out_features, self.group_size, flat.device)[flat]
            out = self.tables.float()[groups[:, None], idx]
            if self.scales is not None:
                out = out * self.scales.float()[flat, None]
            if self.in_scales is not None:
                out = out * self.in_scales.float()
        return out.view(*ids.shape, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """The dequantized [out, in] float32 weight."""
        if not lut.usable(self.packed):
            return self.palette.dense().to(self.packed.device)
        k = self.kernel_tables()
        w = lut.dequant(self.packed, k.tables, k.scales, self.bits, self.group_size, self.in_features)
        return w if k.in_scales is None else w.mul_(k.in_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        fused = x2.shape[0] <= lut.FUSED_MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad)
        if fused and self._kernel_ok(x2):
            k = self.kernel_tables()
            x2 = x2.contiguous()
            if k.integer is not None:
                y = k.integer(x2)
            else:
                if k.in_scales is not None:  # W = W' diag(s), so W x = W' (s ⊙ x)
                    x2 = x2 * k.in_scales
                y = lut.matmul(x2, self.packed, k.tables, k.scales, self.bits, self.group_size)
                if self.bias is not None:
                    y += self.bias
        else:
            y = F.linear(x2, self.dense_weight().to(x.dtype), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = "tensor" if self.group_size == 0 else f"{self.group_size} rows"
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, table per {group}"


class PalettizedEmbedding(nn.Module):
    """An embedding whose table is a palettized [vocab, hidden] weight; with tied embeddings the same
    `PalettizedLinear` is the output head, so input and output share one set of indices and tables."""

    def __init__(self, lut_layer: PalettizedLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.lut = lut_layer
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lut.rows(tokens).to(self.dtype)
