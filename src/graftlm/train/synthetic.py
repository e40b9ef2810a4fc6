"""Text a model writes itself, for calibration and distillation when no dataset is given.

A chat model is given only the start of a user turn (its template up to where the user's words would
go) and writes the user's request, then, since end-of-turn does not stop it, its own answer and more:
the instructions and replies it was tuned on, drawn from its own distribution (Magpie, Xu et al., 2024).
A model without a chat template starts from its BOS token. Sampling is seeded per sample, so the same
seed gives the same text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams
from graftlm.errors import GraftlmError
from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer
from graftlm.progress import progress

log = logging.getLogger(__name__)

MARK = "\x00graftlm-user-text\x00"
BATCH = 32


def user_turn_prefix(tokenizer: Tokenizer) -> list[int]:
    """The token ids a chat starts with up to the user's first word (or just BOS without a template)."""
    if tokenizer.chat_template:
        rendered = tokenizer.render_chat([{"role": "user", "content": MARK}], add_generation_prompt=False)
        if MARK in rendered:
            return tokenizer.encode(rendered.split(MARK)[0], add_special=False)
    bos = tokenizer.bos_id
    if bos is None:
        raise GraftlmError("the model has neither a chat template nor a BOS token to start self-generated text from")
    return [bos]


def self_generated(
    model: Llama,
    tokenizer: Tokenizer,
    samples: int,
    length: int = 256,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """`samples` token sequences of at most `length` tokens (prefix included) that the model sampled."""
    prefix = user_turn_prefix(tokenizer)
    new = max(1, min(length, model.config.max_position_embeddings) - len(prefix))
    gen = Generator(model, tokenizer)
    out: list[list[int]] = []
    for first in range(0, samples, BATCH):
        n = min(BATCH, samples - first)
        params = [
            SamplingParams(max_new_tokens=new, temperature=1.0, top_p=0.95, seed=seed + first + i, ignore_eos=True)
            for i in range(n)
        ]
        for c in gen.generate([prefix] * n, params):
            out.append(prefix + c.token_ids)
        if on_batch is not None:
            on_batch(n)
    log.info("the model wrote %d samples, %d tokens", len(out), sum(map(len, out)))
    return out


def written(model: Llama, tokenizer: Tokenizer, samples: int, length: int, seed: int, use: str) -> list[list[int]]:
    """`self_generated` under a progress bar naming what the text is for (`use`)."""
    with progress(f"the model writes {use} text", samples, "texts") as p:
        return self_generated(model, tokenizer, samples, length, seed, p.advance)
