"""One sequence's decoding state: its sampling settings, random generator, text stream and budget.

Shared by the offline generator and the serving engine, so both choose tokens and finish the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from graftlm.engine.json_mode import JsonConstraint
from graftlm.engine.sampling import SamplingParams, sample
from graftlm.engine.text_stream import TextStream
from graftlm.errors import ConfigError, PromptTooLongError
from graftlm.model.tokenizer import Tokenizer


def check_prompt(ids: Sequence[int], context: int, what: str) -> None:
    """Refuse an empty prompt, or one that leaves no position to generate in `context` positions."""
    if not ids:
        raise ConfigError("the prompt is empty")
    if len(ids) >= context:
        raise PromptTooLongError(
            f"prompt has {len(ids)} tokens but {what} is {context} (at least one position must be left to generate)"
        )


@dataclass
class Accepted:
    token: int
    delta: str  # text settled by this token
    finish_reason: str | None  # "stop" (EOS or stop string), "length", or None while running


class Decoding:
    def __init__(
        self,
        params: SamplingParams,
        tokenizer: Tokenizer,
        stop_ids: set[int],
        budget: int,
        device: torch.device | str = "cpu",
        constraint: JsonConstraint | None = None,
    ):
        self.params = params
        self.stop_ids = stop_ids
        self.budget = budget  # tokens this sequence may still produce (max_new_tokens, cut by the context)
        self.generator = params.generator(device)
        self.stream = TextStream(tokenizer, params.stop)
        self.produced = 0
        self.finish_reason: str | None = None
        self.constraint = constraint  # JSON mode: only tokens that keep the output valid

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits [V]."""
        if self.constraint is not None:
            logits = logits.masked_fill(~self.constraint.allowed().to(logits.device), float("-inf"))
        return sample(logits, self.params, self.generator)

    def accept(self, token: int) -> Accepted:
        """Record `token`; say what text it settles and whether the sequence is finished."""
        self.produced += 1
        if self.constraint is not None:
            self.constraint.advance(token)
        delta = self.stream.push(token)
        eos = token in self.stop_ids and not self.params.ignore_eos
        reason = None
        if self.stream.stopped or eos:
            reason = "stop"
        elif self.produced >= self.budget:
            reason = "length"
        if reason is not None and (reason == "length" or eos):
            delta += self.stream.finish()
        self.finish_reason = reason
        return Accepted(token, delta, reason)
