"""Token speculation: draft the next tokens cheaply, then verify every draft in one forward of the model.

Two drafters. Prompt lookup (Saxena, 2023; `NgramDrafter`) finds the text's last few tokens earlier in
the prompt or the answer and copies what followed. A draft model (`ModelDrafter`) is any smaller or
more compressed model of the same tokenizer (a palettized base drafting for the float32 target, say):
it decodes greedily from the same text on its own KV cache, which keeps what it computed for the
accepted tokens between steps.

Verification is the standard rule (Leviathan et al., 2023; Chen et al., 2023) for a draft that is a
single proposal (q puts all its mass on the drafted token d): accept d with probability p(d); on
rejection sample from p with d removed and renormalised, which is (p - q)+ normalised. The tokens
produced are distributed exactly as decoding one token at a time; with greedy decoding they are the
same tokens (up to float rounding between a one-token and a many-token forward).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from graftlm.engine.generate import StepEvent
from graftlm.engine.kv_cache import KVCache
from graftlm.engine.native_step import NativeStep
from graftlm.engine.sampling import SamplingParams, filter_logits, sample
from graftlm.engine.sequence import Decoding, check_prompt
from graftlm.errors import ConfigError
from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer

MAX_SPEC_TOKENS = 16
# 7 drafts and the last token make 8 rows, the most the decode kernel takes before PyTorch's product
# (graftlm.model.linear.MAX_ROWS); adapting the length to the acceptance gained nothing measurable
# (benchmarks/README.md, "Speculation")
SPEC_TOKENS = 7
# the serving engine drafts only while this many rows or fewer decode: a verification step widens every
# row to the longest draft, and a full batch already keeps the cores busy (benchmarks/README.md, "Speculation")
SPEC_MAX_BATCH = 4
MAX_NGRAM = 3  # the longest suffix looked up; shorter ones are tried when it is not found
MIN_NGRAM = 2  # a one-token match drafts noise more often than not (extract accepted 15% of its drafts)


def check_spec_tokens(k: int) -> int:
    if not 1 <= k <= MAX_SPEC_TOKENS:
        raise ConfigError(f"--spec-tokens must be between 1 and {MAX_SPEC_TOKENS}, got {k}")
    return k


SEPARATOR = -1  # between answers in an `AnswerMemory`: never a token, never drafted


def _follow(seq: Sequence[int], tail: list[int], end: int, k: int) -> list[int]:
    """Up to `k` tokens after the latest occurrence of `tail` that starts before `end` in `seq`."""
    n = len(tail)
    for at in range(min(end, len(seq) - n) - 1, -1, -1):  # the latest occurrence copies the most recent context
        if list(seq[at : at + n]) == tail:
            follow = list(seq[at + n : at + n + k])
            if SEPARATOR in follow:  # the end of an earlier answer
                follow = follow[: follow.index(SEPARATOR)]
            if follow:
                return follow
    return []


def propose(
    history: Sequence[int],
    k: int,
    max_ngram: int = MAX_NGRAM,
    min_ngram: int = MIN_NGRAM,
    memory: Sequence[int] = (),
) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the text's last n tokens (n from
    `max_ngram` down to `min_ngram`), in the text itself, else in `memory` (earlier answers of the same
    adapter: a task's answers share their form, e.g. the keys and punctuation of its JSON); none when
    the suffix occurs in neither."""
    size = len(history)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        tail = list(history[size - n :])
        follow = _follow(history, tail, size - n, k) or _follow(memory, tail, len(memory), k)
        if follow:
            return follow
    return []


class AnswerMemory:
    """The latest answers per key (a tenant and its adapters), for prompt lookup to draft from: at most
    `tokens` per key and `keys` keys, the least recently used key dropped first. Keyed by tenant, so one
    client's drafts never come from another's answers (drafts change no output, but could change timing)."""

    def __init__(self, tokens: int = 1024, keys: int = 4096) -> None:
        self.tokens, self.keys = tokens, keys
        self.store: OrderedDict[Hashable, list[int]] = OrderedDict()

    def get(self, key: Hashable) -> list[int]:
        got = self.store.get(key)
        if got is None:
            return []
        self.store.move_to_end(key)
        return got

    def add(self, key: Hashable, answer: Sequence[int]) -> None:
        """Remember an answer (a separator before it: no match runs from one answer into the next)."""
        kept = [*self.store.pop(key, []), SEPARATOR, *answer][-self.tokens :]
        self.store[key] = kept
        while len(self.store) > self.keys:
            self.store.popitem(last=False)


class Drafter(Protocol):
    def start(self, max_len: int) -> None:
        """A new text of at most `max_len` tokens begins."""

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens that may follow `history` (the prompt and every token accepted so far)."""


class NgramDrafter:
    """Prompt lookup: what followed the latest earlier occurrence of the text's last 3, else 2 tokens,
    in the text, else in the answers this drafter drafted for before (`AnswerMemory`)."""

    def __init__(self) -> None:
        self.memory = AnswerMemory()
        self.text: Sequence[int] = ()
        self.answer_from = -1  # where the current text's answer starts

    def start(self, max_len: int) -> None:
        if self.answer_from >= 0:
            self.memory.add("", self.text[self.answer_from :])
        self.text, self.answer_from = (), -1

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        if self.answer_from < 0:
            self.answer_from = len(history) - 1  # the prompt and the first token, chosen by the prefill
        self.text = history
        return propose(history, k, memory=self.memory.get(""))


def check_draft(target: Llama, target_tok: Tokenizer, draft: Llama, draft_tok: Tokenizer) -> None:
    """Refuse a draft model whose tokens do not mean the target's: another vocabulary or tokenizer."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(
            f"the draft model's vocabulary has {draft.config.vocab_size} tokens and the target's "
            f"{target.config.vocab_size}: a draft model must share the target's tokenizer"
        )
    if draft_tok.backend.get_vocab(with_added_tokens=True) != target_tok.backend.get_vocab(with_added_tokens=True):
        raise ConfigError("the draft model's tokenizer differs from the target's: its token ids mean other text")


class ModelDrafter:
    """Greedy drafts from a draft model. Its KV cache holds the keys and values of the tokens it was fed
    (`fed`); a step feeds only what differs from the text since (the token after the accepted drafts,
    or after the last rejection), in one call, then decodes the rest one token at a time."""

    def __init__(self, model: Llama) -> None:
        self.model = model
        self.cache: KVCache | None = None
        self.native: NativeStep | None = None
        self.fed: list[int] = []

    def start(self, max_len: int) -> None:
        if self.cache is None or self.cache.max_len < max_len:
            cfg = self.model.config
            self.cache = KVCache(cfg, 1, min(max_len, cfg.max_position_embeddings), self.model.dtype, self.model.device)
            self.native = NativeStep.build(self.model, self.cache)
        self.fed = []

    def _next(self, tokens: list[int], at: int) -> int:
        """The draft model's greedy token after `tokens` fed at cache positions `at`, `at + 1`, ..."""
        assert self.cache is not None
        if self.native is not None and len(tokens) <= NativeStep.MAX_TOKENS:
            logits = self.native(tokens, at)[-1]
        else:
            ids = torch.tensor([tokens], device=self.model.device)
            positions = torch.arange(at, at + len(tokens), device=self.model.device)[None]
            logits = self.model(ids, positions, self.cache, at, last_only=True)[0, -1]
        self.fed[at:] = tokens
        return int(logits.argmax())

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        assert self.cache is not None, "start() first"
        k = min(k, self.cache.max_len - len(history))
        if k <= 0:
            return []
        same = 0
        for a, b in zip(self.fed, history, strict=False):
            if a != b:
                break
            same += 1
        same = min(same, len(history) - 1)  # the last token is fed again: its logits give the first draft
        out = [self._next(list(history[same:]), same)]
        while len(out) < k:
            out.append(self._next([out[-1]], len(history) + len(out) - 1))
        return out


def accepted_prefix(picks: Sequence[int], draft: Sequence[int]) -> int:
    """How many drafts greedy decoding keeps: those equal to the model's pick before them."""
    n = 0
    while n < len(draft) and picks[n] == draft[n]:
        n += 1
    return n


def verify(
    logits: torch.Tensor, draft: Sequence[int], params: SamplingParams, generator: torch.Generator | None
) -> list[int]:
    """The accepted prefix of `draft` plus one token of the model's own, from logits [len(draft)+1, V]
    where row i predicts what follows draft[:i]."""
    out: list[int] = []
    for i, d in enumerate(draft):
        if params.greedy:
            t = int(logits[i].argmax())
            out.append(t)
            if t != d:
                return out
            continue
        probs = filter_logits(logits[i].float(), params).softmax(-1)
        if float(torch.rand((), generator=generator)) < float(probs[d]):
            out.append(d)
            continue
        probs[d] = 0.0  # the residual (p - q)+ for a point-mass draft
        out.append(int(torch.multinomial(probs / probs.sum(), 1, generator=generator)))
        return out
    out.append(sample(logits[len(draft)], params, generator))
    return out


@dataclass
class SpecStats:
    forwards: int = 0  # forwards of the model after the prompt's (which gives the first token)
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens out per forward of the model, the prompt's included (1.0 without speculation)."""
        return self.tokens / (self.forwards + 1) if self.tokens else 0.0


@torch.inference_mode()
def speculative_steps(
    model: Llama,
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    params: SamplingParams,
    k: int,
    stats: SpecStats | None = None,
    drafter: Drafter | None = None,
) -> Iterator[StepEvent]:
    """One prompt's answer, drafting up to `k` tokens a step (by prompt lookup unless another `drafter` is
    given); events as `Generator.steps`."""
    check_spec_tokens(k)
    drafter = drafter if drafter is not None else NgramDrafter()
    window = model.config.max_position_embeddings
    check_prompt(prompt, window, "the model's context window")
    stats = stats if stats is not None else SpecStats()
    device = model.device
    budget = min(params.max_new_tokens, window - len(prompt))
    stop_ids = tokenizer.stop_ids(model.config.eos_token_id)
    row = Decoding(params, tokenizer, stop_ids, budget, device)
    cache = KVCache(model.config, 1, min(window, len(prompt) + budget + k + 1), model.dtype, device)
    tokens = torch.tensor([list(prompt)], device=device)
    logits = model(tokens, None, cache, 0, last_only=True)[:, -1]  # [1, V]
    native = NativeStep.build(model, cache) if k + 1 <= NativeStep.MAX_TOKENS else None
    drafter.start(cache.max_len)
    history = list(prompt)
    new = [row.choose(logits[0])]
    start = len(prompt)  # the cache holds positions [0, start); new[-1] is not in it yet
    while True:
        for t in new:
            got = row.accept(t)
            stats.tokens += 1
            history.append(t)
            yield StepEvent(0, t, got.delta, got.finish_reason)
            if got.finish_reason is not None:
                return
        room = min(k, budget - row.produced - 1, cache.max_len - start - 1)
        draft = drafter.propose(history, room) if room > 0 else []
        if native is not None:  # the verification forward as one native call
            logits = native([history[-1], *draft], start)  # [1 + len(draft), V]
        else:
            ids = torch.tensor([[history[-1], *draft]], device=device)  # [1, 1 + len(draft)]
            positions = torch.arange(start, start + ids.shape[1], device=device)[None]
            logits = model(ids, positions, cache, start)[0]
        new = verify(logits, draft, params, row.generator)
        stats.forwards += 1
        stats.drafted += len(draft)
        stats.accepted += len(new) - 1
        start += len(new)  # the last token and the accepted drafts are now in the cache
