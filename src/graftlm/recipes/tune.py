"""Palette tuning: the tables and scales of a palettized model trained to imitate the uncompressed one.

k-means and GPTQ choose each weight's tables and indices to keep that weight's own output close; the
errors of all layers then add up through the network. Tuning keeps every index (so the bits per weight do
not change) and trains what the indices point at, the float16 tables and the row and input-column scales,
end to end by the KL between the uncompressed model's next-token distributions and the palettized
model's on the calibration text and on text the uncompressed model writes (the codebook fine-tuning of
AQLM, Egiazarian et al., 2024, and of PV-tuning, with the discrete half left alone). It is a few hundred
thousand numbers for a 135M model.

Moving indices as well (PV-tuning's V-step, linearized: each step, the fraction of indices whose move to
a neighbouring table entry lowers the loss most to first order) was tried and dropped: the first-order
gain ignores curvature, and a V-step needs a second-order estimate to choose its moves. What tuning gains,
and what the V-step lost: benchmarks/README.md, "Palette tuning".

While they train, palettized projections are swapped for `TunableLinear`, which computes its weight from
float32 copies of the tables and from log-factors on the scales; `tune_palettes` writes the results back
into the palettized layers as float16 and swaps them back. The embedding and the output head it shares
stay as they are: tuning them too was slower and no better.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.model.llama import Llama
from graftlm.model.modules import replace_module
from graftlm.quant.linear import PalettizedLinear
from graftlm.quant.model import EMBED, palettized_modules
from graftlm.train.distill import as_examples, kl_loss
from graftlm.train.trainer import Loop, TrainConfig, TrainResult

log = logging.getLogger(__name__)

# the tuning text is the calibration text plus TUNE_SAMPLES self-written texts, one pass over it: more passes
# over the same text fit the text, not the model (benchmarks/README.md, "Palette tuning")
TUNE_SAMPLES = 128
TUNE_STEPS = 32
TUNE_LR = 5e-4
TUNE_BATCH = 8
# the scales' log-factors move this many times faster than the tables (Adam's step is the learning rate
# whatever the gradient's size, so the factor is its learning-rate multiplier; see "Palette tuning")
SCALE_RATE = 5.0


class _Dequant(torch.autograd.Function):
    """W = tables[flat] · row[:, None] · col[None, :], recomputed in the backward pass instead of kept
    (one layer's temporaries at a time); the tables' gradient is a weighted histogram of the indices,
    much faster on the CPU than the scatter-add autograd would use for an index."""

    @staticmethod
    def forward(ctx, tables, row, col, flat):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(tables, row, col, flat)
        return tables.reshape(-1)[flat].view(row.numel(), col.numel()) * row[:, None] * col[None, :]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        tables, row, col, flat = ctx.saved_tensors
        base = tables.reshape(-1)[flat].view(row.numel(), col.numel())
        need_row, need_col = ctx.needs_input_grad[1:3]  # a layer without those scales passes constant ones
        g_row = (grad * base * col[None, :]).sum(1) if need_row else None
        g_base = grad * row[:, None]
        g_col = (g_base * base).sum(0) if need_col else None
        g_base.mul_(col[None, :])
        g_tables = torch.bincount(flat, weights=g_base.reshape(-1), minlength=tables.numel())
        return g_tables.to(tables.dtype).view(tables.shape), g_row, g_col, None


class TunableLinear(nn.Module):
    """A palettized linear layer whose tables and scales are parameters (its indices are fixed)."""

    def __init__(self, layer: PalettizedLinear):
        super().__init__()
        self.layer = layer
        k = 1 << layer.bits
        p = layer.palette
        # each weight's place in the flattened tables (its row's table, then its index); int32 halves it
        flat = (p.row_groups()[:, None] * k + p.indices()).reshape(-1).to(torch.int32)
        self.register_buffer("flat", flat, persistent=False)
        self.tables = nn.Parameter(layer.tables.float().clone())
        # scales train as log-factors: a step moves every scale by the same fraction, whatever its size
        self.log_row = None if layer.scales is None else nn.Parameter(torch.zeros(layer.out_features))
        self.log_in = None if layer.in_scales is None else nn.Parameter(torch.zeros(layer.in_features))

    def _row(self) -> torch.Tensor:
        if self.layer.scales is None or self.log_row is None:
            return torch.ones(self.layer.out_features, device=self.tables.device)
        return self.layer.scales.float() * (SCALE_RATE * self.log_row).exp()

    def _col(self) -> torch.Tensor:
        if self.layer.in_scales is None or self.log_in is None:
            return torch.ones(self.layer.in_features, device=self.tables.device)
        return self.layer.in_scales.float() * (SCALE_RATE * self.log_in).exp()

    def weight(self) -> torch.Tensor:
        """The [out, in] float32 weight the current tables and scales give."""
        return _Dequant.apply(self.tables, self._row(), self._col(), self.flat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.layer.bias)

    @torch.no_grad()
    def written_back(self) -> PalettizedLinear:
        """The palettized layer with the trained tables and scales (float16)."""
        layer = self.layer
        layer.tables = self.tables.detach().to(layer.tables.dtype)
        if layer.scales is not None:
            layer.scales = self._row().to(layer.scales.dtype)
        if layer.in_scales is not None:
            layer.in_scales = self._col().to(layer.in_scales.dtype)
        return layer


def tune_palettes(
    student: Llama,
    teacher: Llama,
    sequences: Sequence[Sequence[int]],
    config: TrainConfig,
    steps: int,
    pad_id: int,
) -> TrainResult:
    """Train the tables and scales of `student`'s palettized projections (in place) for `steps` steps of
    `config.batch_size` sequences, so that its next-token distributions on `sequences` match `teacher`'s."""
    examples = as_examples(sequences, "calibration")
    if not examples or steps < 1:
        raise ValueError("tuning needs calibration sequences and at least one step")
    per_epoch = math.ceil(len(examples) / config.batch_size)
    config = replace(config, epochs=math.ceil(steps / per_epoch), max_steps=steps, eval_every=0, save_every=0)
    for p in list(teacher.parameters()) + list(student.parameters()):
        p.requires_grad_(False)
    tunable = {name: TunableLinear(layer) for name, layer in palettized_modules(student) if name != EMBED}
    for name, module in tunable.items():
        replace_module(student, name, module)
    params = {f"{name}.{n}": p for name, m in tunable.items() for n, p in m.named_parameters()}
    count = sum(p.numel() for p in params.values())
    log.info("tuning %d numbers in the tables and scales of %d weights", count, len(tunable))
    try:
        loop = Loop(student, params, config, pad_id, loss=kl_loss(teacher))
        result = loop.run(examples, description="tuning palettes")
    except BaseException:
        for name, module in tunable.items():  # the model as it was
            replace_module(student, name, module.layer)
        raise
    for name, module in tunable.items():
        replace_module(student, name, module.written_back())
    student._fingerprint = None
    log.info("tuned palettes: %d steps, final KL %.4f per token", result.steps, result.train_loss)
    return result
