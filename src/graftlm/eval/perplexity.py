"""Perplexity of a model on plain text: exp of the mean next-token negative log-likelihood."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer


def text_chunks(
    tokenizer: Tokenizer, texts: Sequence[str], seq_len: int, max_tokens: int | None = None
) -> list[list[int]]:
    """The texts tokenized, joined by EOS and cut into sequences of `seq_len` tokens (the last may be shorter)."""
    eos = tokenizer.eos_id
    stream: list[int] = []
    for t in texts:
        stream += tokenizer.encode(t, add_special=False) + ([eos] if eos is not None else [])
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if max_tokens is not None:
        stream = stream[:max_tokens]
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len) if len(stream[i : i + seq_len]) > 1]


def spread(pieces: list[list[int]], n: int) -> list[list[int]]:
    """At most `n` of `pieces`, evenly spaced, so a long file is sampled throughout and not just its start."""
    if len(pieces) <= n:
        return pieces
    return [pieces[i * len(pieces) // n] for i in range(n)]


@torch.inference_mode()
def perplexity(
    model: Llama, sequences: Sequence[Sequence[int]], on_sequence: Callable[[], None] | None = None
) -> float:
    """exp(mean NLL) over every predicted token of every sequence (each scored on its own)."""
    total, count = 0.0, 0
    for seq in sequences:
        ids = torch.tensor([list(seq)], device=model.device)
        logits = model(ids)[0, :-1]
        total += float(F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
        if on_sequence is not None:
            on_sequence()
    return math.exp(total / max(count, 1))
