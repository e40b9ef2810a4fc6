"""What becomes of a training example longer than the limit, and choosing the limit from the data.

The part of an example an adapter learns from is its completion (the assistant's turns), so by default
(`truncate-prompt`) a long example loses prompt tokens, not completion tokens: the middle of the longest
user text is cut out and replaced by a marker, keeping the system prompt, the start of the instruction
and the end of the text; only a completion that alone exceeds the limit is cut at its end. The other
choices: `truncate-end` (keep the first tokens, whatever they are), `reject` (an error naming the file and
line) and `drop` (leave the example out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

ON_LONG = ("truncate-prompt", "truncate-end", "reject", "drop")
OLD_NAMES = {"truncate": "truncate-end"}  # what the choices were called before, still accepted
MARKER = " [...] "
AUTO_COVERAGE = 0.99  # `auto` fits this share of the examples whole
TOKEN_BUDGET = 8192  # tokens per micro-batch `auto` stays within (8 x 1024: 2.5 GB, every layer recomputed)
LENGTH_STEP = 64

Tokens = tuple[list[int], list[bool]]  # an example's ids and which of them are targets


@dataclass
class LongReport:
    """How the limit treated the examples, for the run's log and record."""

    limit: int
    examples: int = 0
    prompt_cut: int = 0  # examples whose prompt lost its middle
    prompt_tokens: int = 0  # tokens those lost in all
    completion_cut: int = 0  # examples whose completion alone was too long: cut at its end
    end_cut: int = 0  # examples cut at the end by `truncate-end`
    end_tokens: int = 0
    dropped: int = 0

    def line(self) -> str:
        parts = []
        if self.prompt_cut:
            parts.append(f"{self.prompt_cut} lost the middle of their prompt ({self.prompt_tokens:,} tokens in all)")
        if self.completion_cut:
            parts.append(f"{self.completion_cut} had a completion longer than the limit, cut at its end")
        if self.end_cut:
            parts.append(f"{self.end_cut} were cut at the end ({self.end_tokens:,} tokens in all)")
        if self.dropped:
            parts.append(f"{self.dropped} were dropped")
        if not parts:
            return f"every example fits in {self.limit} tokens"
        return f"of {self.examples} examples longer than {self.limit} tokens, " + "; ".join(parts)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def auto_limit(lengths: list[int], batch_size: int, context: int) -> tuple[int, str]:
    """A limit that fits `AUTO_COVERAGE` of the examples whole, in steps of 64 tokens, within the token
    budget of a micro-batch and the model's context; and a sentence saying why."""
    ordered = sorted(lengths)
    covered = ordered[min(len(ordered) - 1, math.ceil(AUTO_COVERAGE * len(ordered)) - 1)]
    wanted = LENGTH_STEP * math.ceil(covered / LENGTH_STEP)
    budget = max(LENGTH_STEP, TOKEN_BUDGET // batch_size // LENGTH_STEP * LENGTH_STEP)
    limit = min(wanted, budget, context)
    over = sum(n > limit for n in lengths)
    why = f"{over} of {len(lengths)} examples are longer" if over else f"all {len(lengths)} examples fit"
    if limit < wanted:
        cap = "the model's context" if limit == context else f"{TOKEN_BUDGET} tokens per batch of {batch_size}"
        why += f"; {wanted} would fit {AUTO_COVERAGE:.0%} of them, but {cap} caps it"
    return limit, f"max length auto: {limit} tokens ({why})"


def shorten_prompt(obj: dict[str, Any], encode: Callable[[dict[str, Any]], Tokens], limit: int) -> Tokens | None:
    """The example with as much of the middle of its longest user text cut as it takes to fit `limit`;
    None when there is no user text to cut, or when even cutting all of it does not fit (the completion
    alone is too long)."""
    where = _longest_user_text(obj)
    if where is None:
        return None
    text = _get(obj, where)
    lo, hi, best = 0, len(text) - 1, None
    while lo <= hi:  # the most characters kept (head and tail) that still fit
        keep = (lo + hi) // 2
        ids, targets = encode(_set(obj, where, _cut(text, keep)))
        if len(ids) <= limit:
            best, lo = (ids, targets), keep + 1
        else:
            hi = keep - 1
    return best


def without_user_text(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The example with its longest user text cut down to the marker (None: it has none)."""
    where = _longest_user_text(obj)
    return None if where is None else _set(obj, where, MARKER.strip())


def _cut(text: str, keep: int) -> str:
    head = (keep + 1) // 2
    return text[:head] + MARKER + text[len(text) - (keep - head) :]


def _longest_user_text(obj: dict[str, Any]) -> tuple[Any, ...] | None:
    """Where the text to cut is: ("messages", i, "content") or ("prompt",)."""
    if isinstance(obj.get("messages"), list):
        users = [
            (len(m["content"]), i)
            for i, m in enumerate(obj["messages"])
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
        ]
        return ("messages", max(users)[1], "content") if users and max(users)[0] > 0 else None
    if isinstance(obj.get("prompt"), str) and obj["prompt"] and "completion" in obj:
        return ("prompt",)
    return None


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _set(obj: dict[str, Any], path: tuple[Any, ...], value: str) -> dict[str, Any]:
    """A copy of `obj` with the text at `path` replaced (the original is left as it is)."""
    if path == ("prompt",):
        return {**obj, "prompt": value}
    _, i, _ = path
    messages = [dict(m) for m in obj["messages"]]
    messages[i]["content"] = value
    return {**obj, "messages": messages}
