"""Next-token cross-entropy on target positions only (the logits of other positions are never built)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graftlm.model.llama import Llama
from graftlm.train.data import Batch


def completion_loss(model: Llama, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's target tokens, and how many there are.

    Right padding keeps every real token's keys before its padding, so plain causal attention is exact.
    """
    h = model.hidden(batch.tokens)  # [B, S, hidden]
    pick = batch.targets[:, 1:]  # token s+1 is predicted from position s
    logits = model.logits(h[:, :-1][pick])  # [N, V]: only where a target is scored
    labels = batch.tokens[:, 1:][pick]
    return F.cross_entropy(logits, labels, reduction="sum"), int(pick.sum())
