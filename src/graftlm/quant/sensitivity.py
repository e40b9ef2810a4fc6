"""How much each weight matters, measured on calibration text.

- Fisher: the diagonal of the empirical Fisher information, Σ (∂loss/∂w)² over calibration sequences.
  Σ F·(W − Q)² approximates the loss a quantization Q of W adds (a second-order Taylor expansion with the
  Fisher standing in for the Hessian), so it both weights k-means (SqueezeLLM, Kim et al., 2024) and
  compares tensors with one another when the mixed-bit plan chooses their widths (scaled per tensor to a
  loss measured end to end, `probe.py`).
- Activation: the mean square of each input feature, E[x_j²] (the importance matrix of llama.cpp): the
  output error of a linear layer is Σ_j E[x_j²]·(W − Q)_ij² when features are uncorrelated.
- Gram: E[x xᵀ] of each projection's input (a tied embedding's: the output head's), the Hessian of its
  output error, for GPTQ (`gptq.py`) and the recovery adapter's start (`train/eora.py`); its diagonal is
  the activation statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.errors import GraftlmError
from graftlm.model.llama import Llama
from graftlm.quant.model import EMBED, HEAD, dense_weights

# fewer calibration tokens than this cannot tell tensors apart reliably
MIN_TOKENS = 1024


class CalibrationError(GraftlmError):
    """Calibration text that cannot estimate sensitivity (too short, empty)."""


@dataclass
class Sensitivity:
    fisher: dict[str, torch.Tensor]  # [out, in] per palettizable weight
    activation: dict[str, torch.Tensor]  # [in]: E[x²] of the weight's input features
    tokens: int  # calibration tokens scored
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # [in, in]: E[x xᵀ] of what multiplies the weight

    def cpu(self) -> Sensitivity:
        def move(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.cpu() for k, v in d.items()}

        return Sensitivity(move(self.fisher), move(self.activation), self.tokens, move(self.gram))


def check_calibration(sequences: Sequence[Sequence[int]]) -> int:
    tokens = sum(max(0, len(s) - 1) for s in sequences)
    if tokens < MIN_TOKENS:
        raise CalibrationError(
            f"calibration text too short to estimate sensitivity: {tokens} scored tokens, need at least "
            f"{MIN_TOKENS} (give more text, or let the model write its own)"
        )
    return tokens


def measure(
    model: Llama,
    sequences: Sequence[Sequence[int]],
    on_sequence: Callable[[], None] | None = None,
    gram: bool = False,
) -> Sensitivity:
    """Fisher diagonal and input-feature statistics of every palettizable weight, one sequence at a time;
    with `gram`, also each projection's input Gram matrix."""
    tokens = check_calibration(sequences)
    weights = dict(dense_weights(model))
    saved = {name: w.requires_grad for name, w in weights.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    act = {name: torch.zeros(w.shape[1], dtype=torch.float64, device=w.device) for name, w in weights.items()}
    multiplied = [n for n in weights if n != EMBED or model.config.tie_word_embeddings]  # a tied one: as the head
    grams = {n: torch.zeros(weights[n].shape[1], weights[n].shape[1], device=model.device) for n in multiplied if gram}
    hooks = _activation_hooks(model, list(act), act, grams)
    try:
        for seq in sequences:
            ids = torch.tensor([list(seq)], device=model.device)
            logits = model(ids)
            loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            model.zero_grad(set_to_none=True)
            loss.backward()
            for name, w in weights.items():
                if w.grad is not None:
                    fisher[name] += w.grad.float().square()
            if on_sequence is not None:
                on_sequence()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        for name, w in weights.items():
            w.requires_grad_(saved[name])
    n = sum(len(s) for s in sequences)
    stats = {k: (v if k == EMBED and not model.config.tie_word_embeddings else v / n).float() for k, v in act.items()}
    return Sensitivity(fisher, stats, tokens, {k: v / n for k, v in grams.items()})


@torch.inference_mode()
def input_grams(
    model: Llama,
    sequences: Sequence[Sequence[int]],
    names: Sequence[str],
    on_sequence: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """E[x xᵀ] [in, in] of the inputs of each named projection (module paths as `weight_names` gives them)
    over `sequences`, from forward passes alone."""
    width = {n: model.get_submodule(n).in_features for n in names}
    grams = {n: torch.zeros(width[n], width[n], device=model.device) for n in names}
    hooks = _activation_hooks(model, names, None, grams)
    try:
        for seq in sequences:
            model(torch.tensor([list(seq)], device=model.device))
            if on_sequence is not None:
                on_sequence()
    finally:
        for h in hooks:
            h.remove()
    n = max(sum(len(s) for s in sequences), 1)
    return {k: v / n for k, v in grams.items()}


def _activation_hooks(
    model: Llama,
    names: Sequence[str],
    act: dict[str, torch.Tensor] | None,
    grams: dict[str, torch.Tensor],
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks on each named weight's input (a tied embedding: the head's) that add Σ x_j² into `act`, where
    given, and Σ x xᵀ into `grams` for the names it holds. An untied embedding is looked up, not
    multiplied: it gets no hook and keeps uniform statistics."""
    hooks = []
    for name in names:
        if name == EMBED and not model.config.tie_word_embeddings:
            if act is not None:
                act[name] += 1.0
            continue
        module: nn.Module = model.get_submodule(HEAD if name == EMBED else name)

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if act is not None:
                act[name] += x.double().square().sum(0)
            if name in grams:
                grams[name] += x.float().T @ x.float()

        hooks.append(module.register_forward_pre_hook(hook))
    return hooks
