"""The recovery adapter's starting point: the compression error itself, cut to the adapter's rank.

A compressed projection computes Q x where the teacher computes W x. The LoRA update s·BA of rank r that
best cancels the output error, min ‖(W − Q − s·BA) X‖ over calibration inputs X, is the rank-r truncation
of the error in the eigenspace of the inputs' Gram matrix H = E[x xᵀ] = U Λ Uᵀ (EoRA, Liu et al., 2024):
with M = (W − Q) U Λ^½ and its r leading singular triplets M ≈ P S Vᵀ, s·BA = P S Vᵀ Λ^-½ Uᵀ, split as
B = P S^½ / √s and A = S^½ Vᵀ Λ^-½ Uᵀ / √s. Distillation then starts from it instead of from B = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from graftlm.lora.config import AdapterError, LoraConfig
from graftlm.lora.layer import base_weight
from graftlm.lora.model import PEFT_PREFIX
from graftlm.model.llama import Llama
from graftlm.model.modules import module_path, projections
from graftlm.quant.sensitivity import input_grams

# H is scaled to a mean eigenvalue of 1, plus this on its diagonal: directions the inputs never take
# would otherwise get unbounded weight in A (Λ^-½)
DAMP = 0.01


def low_rank_error(
    delta: torch.Tensor, gram: torch.Tensor, rank: int, damp: float = DAMP
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A) with B @ A the rank-`rank` approximation of `delta` [out, in] that minimises the output error
    on inputs whose Gram matrix is `gram` [in, in]; also the fraction of that (damped) error it removes."""
    h = gram.double() / gram.diagonal().mean().clamp_min(1e-30)
    lam, u = torch.linalg.eigh(h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
    lam = lam.clamp_min(max(damp, 1e-12))  # [in]; eigh may return tiny negatives around the damping
    p, s, vt = torch.linalg.svd(delta.double() @ u * lam.sqrt(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = p[:, :r] * root  # [out, r]
    a = (root[:, None] * vt[:r]) / lam.sqrt() @ u.T  # [r, in]
    removed = float(s[:r].square().sum() / s.square().sum().clamp_min(1e-30))
    return b.float(), a.float(), removed


def error_init(
    teacher: Llama,
    student: Llama,
    sequences: Sequence[Sequence[int]],
    lora: LoraConfig,
    on_sequence: Callable[[], None] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """PEFT-named LoRA tensors for every projection `lora` targets, each the student's compression error
    (teacher − student weight) at the adapter's rank, weighted by the student's inputs on `sequences`;
    also the fraction of its weighted error each removes, averaged over the projections."""
    if lora.use_dora:
        raise AdapterError("the compression-error initialisation is for LoRA, not DoRA")
    teachers = {module_path(i, t): p for i, t, p in projections(teacher)}
    chosen = {module_path(i, t): p for i, t, p in projections(student) if lora.targets_module(i, t)}
    grams = input_grams(student, sequences, [p.removeprefix("model.") for p in chosen], on_sequence)
    tensors: dict[str, torch.Tensor] = {}
    removed = []
    for path, module in chosen.items():
        if path not in teachers:
            raise AdapterError(f"{path}: the teacher has no such projection (the two models differ in depth)")
        w, q = base_weight(teachers[path]).detach(), base_weight(module).detach()
        if w.shape != q.shape:
            raise AdapterError(f"{path}: the teacher's weight is {tuple(w.shape)}, the student's {tuple(q.shape)}")
        rank, _ = lora.rank_alpha(path)
        b, a, part = low_rank_error(w.double() - q.double(), grams[path.removeprefix("model.")], rank)
        root = lora.scale(path) ** 0.5
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a / root
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b / root
        removed.append(part)
    return tensors, sum(removed) / max(len(removed), 1)
