"""A weight's quantization loss measured end to end, to calibrate the mixed-bit plan's estimates.

The plan compares tensors by an estimated loss (`palettize._loss_cost`: the Fisher diagonal times the
output error), a second-order guess that treats every tensor alike. How an error in a weight grows on its
way to the logits differs between tensors in ways that guess misses (keys act through a softmax, early
layers through every later one). `KLProbe` measures it: the mean per-token KL from the uncompressed
model's next-token distributions to those of the same model with one weight replaced, on a few calibration
sequences. Measuring every width of every weight costs a forward pass each; measuring one width per
weight and scaling that weight's estimates to it does as well for a fraction of the time
(benchmarks/README.md, "Palettization: input scales, the head's floor, the KL probe").

Each decoder layer's input is kept, so a weight of layer i reruns layers i.. only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from graftlm.model.llama import Llama
from graftlm.model.modules import module_path, projections
from graftlm.quant.model import HEAD


class KLProbe:
    """The uncompressed model's distributions on a few sequences, and the KL of one weight replaced."""

    @torch.no_grad()
    def __init__(self, model: Llama, sequences: Sequence[Sequence[int]]):
        if not sequences:
            raise ValueError("the probe needs at least one sequence")
        self.model = model
        self.layer_of = {module_path(i, t).removeprefix("model."): i for i, t, _ in projections(model)}
        self.ids = [torch.tensor([list(s)], device=model.device) for s in sequences]
        self.contexts = [model.context(ids) for ids in self.ids]  # rotary tables and mask, per sequence
        self.tokens = sum(len(s) for s in sequences)
        self.inputs: list[list[torch.Tensor]] = []  # per sequence, each decoder layer's input
        self.last: list[torch.Tensor] = []  # per sequence, the last decoder layer's output
        self.reference: list[torch.Tensor] = []  # per sequence, log-probabilities [S, V]
        for ids, ctx in zip(self.ids, self.contexts, strict=True):
            x, kept = model.embed_tokens(ids), []
            for layer in model.layers:
                kept.append(x)
                x = layer(x, ctx)
            self.inputs.append(kept)
            self.last.append(x)
            self.reference.append(F.log_softmax(model.logits(x)[0], -1))

    @torch.no_grad()
    def kl(self, name: str, weight: torch.Tensor) -> float:
        """Mean KL per token (nats) when the weight `name` (a `weight_names` path) is `weight` instead."""
        param = self.model.get_submodule(name).weight
        if weight.shape != param.shape:
            raise ValueError(f"{name} is {list(param.shape)}, not {list(weight.shape)}")
        kept = param.data
        param.data = weight.to(kept.dtype)  # a tied embedding is the head too: both see it
        try:
            total = 0.0
            for n, ids in enumerate(self.ids):
                log_p = F.log_softmax(self._logits(name, n, ids), -1)
                total += float(F.kl_div(log_p, self.reference[n], log_target=True, reduction="sum"))
        finally:
            param.data = kept
        return total / self.tokens

    def _logits(self, name: str, n: int, ids: torch.Tensor) -> torch.Tensor:
        if name == HEAD:
            return self.model.logits(self.last[n])[0]
        i = self.layer_of.get(name)
        if i is None:  # the embedding: everything after it
            return self.model(ids)[0]
        x = self.inputs[n][i]
        for layer in self.model.layers[i:]:
            x = layer(x, self.contexts[n])
        return self.model.logits(x)[0]
