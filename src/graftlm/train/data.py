"""Training data from JSONL: chat `messages` (OpenAI fine-tuning format), `prompt`/`completion`, or `text`.

Each line becomes token ids plus a target mask: loss is taken on assistant / completion tokens only
(on every token for `text`). Problems are reported with the file and line number.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graftlm.errors import ConfigError, GraftlmError
from graftlm.model.tokenizer import Message, Tokenizer
from graftlm.train.long import OLD_NAMES, ON_LONG, LongReport, shorten_prompt, without_user_text


class DataError(GraftlmError):
    """A training or evaluation file with a bad line."""


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    targets: tuple[bool, ...]  # targets[i]: is ids[i] predicted (and scored)?
    source: str  # "file:line"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(self.targets)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a malformed line is a `DataError` naming it."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    with path.open("rb") as f:  # bytes, so that bad UTF-8 is reported with its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e
            except RecursionError:
                raise DataError(f"{path}:{n}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def _chat_example(tok: Tokenizer, messages: list[Message], where: str) -> tuple[list[int], list[bool]]:
    """Tokens of the rendered chat; targets on each assistant message (unless it has weight 0)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for m in messages:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(f"{where}: each message needs a role (system, user, assistant) and string content")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids: list[int] = []
    targets: list[bool] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.encode_chat(clean[:i], add_generation_prompt=True)
        after = tok.encode_chat(clean[: i + 1], add_generation_prompt=False)
        if after[: len(before)] != before or before[: len(ids)] != ids:
            raise DataError(f"{where}: the chat template does not render this conversation as a growing prefix")
        targets += [False] * (len(before) - len(ids)) + [m.get("weight", 1) != 0] * (len(after) - len(before))
        ids = after
    return ids, targets


def encode_example(obj: dict[str, Any], tok: Tokenizer, where: str, use_chat: bool) -> tuple[list[int], list[bool]]:
    eos = [tok.eos_id] if tok.eos_id is not None else []
    if "messages" in obj:
        if not tok.chat_template:
            raise DataError(f"{where}: chat 'messages' need a model with a chat template")
        return _chat_example(tok, obj["messages"], where)
    if "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
        if use_chat and tok.chat_template:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return _chat_example(tok, msgs, where)
        p, c = tok.encode(prompt), tok.encode(completion, add_special=False) + eos
        return p + c, [False] * len(p) + [True] * len(c)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        ids = tok.encode(obj["text"]) + eos
        return ids, [True] * len(ids)
    raise DataError(f"{where}: a line needs 'messages', 'prompt' and 'completion', or 'text' (got {sorted(obj)})")


@dataclass(frozen=True)
class Encoded:
    """A line of a data file, tokenized whole."""

    obj: dict[str, Any]
    ids: list[int]
    targets: list[bool]
    where: str  # "file:line"


def encode_file(path: Path, tok: Tokenizer, use_chat: bool = True) -> list[Encoded]:
    """Every line of a JSONL file as token ids and targets, nothing cut yet."""
    out = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        out.append(Encoded(obj, *encode_example(obj, tok, where, use_chat), where))
    if not out:
        raise DataError(f"{path} has no examples")
    return out


def fit_examples(
    encoded: list[Encoded], tok: Tokenizer, limit: int, on_long: str = "truncate-prompt", use_chat: bool = True
) -> tuple[list[Example], LongReport]:
    """The examples within `limit` tokens, long ones treated as `on_long` says (see `graftlm.train.long`)."""
    on_long = OLD_NAMES.get(on_long, on_long)
    if on_long not in ON_LONG:
        raise ConfigError(f"on_long must be one of {', '.join(ON_LONG)}, got {on_long!r}")
    report = LongReport(limit, examples=len(encoded))
    out = []
    for e in encoded:
        ids, targets = e.ids, list(e.targets)
        if len(ids) > limit:
            fitted = _fit(e, tok, limit, on_long, use_chat, report)
            if fitted is None:
                continue
            ids, targets = fitted
        # position 0 is never predicted: nothing comes before it
        targets[0:1] = [False] * min(1, len(targets))
        if not any(targets):
            why = " after truncation to the max length" if len(ids) == limit else ""
            raise DataError(f"{e.where}: example has no completion tokens to learn from{why}")
        out.append(Example(tuple(ids), tuple(targets), e.where))
    if not out:
        raise DataError(f"{encoded[0].where.rpartition(':')[0]} has no examples within {limit} tokens")
    return out, report


def _fit(
    e: Encoded, tok: Tokenizer, limit: int, on_long: str, use_chat: bool, report: LongReport
) -> tuple[list[int], list[bool]] | None:
    """An over-long example made to fit (None: dropped)."""
    if on_long == "reject":
        raise DataError(f"{e.where}: example has {len(e.ids)} tokens, more than max length {limit}")
    if on_long == "drop":
        report.dropped += 1
        return None
    if on_long == "truncate-prompt":
        encode = lambda obj: encode_example(obj, tok, e.where, use_chat)  # noqa: E731
        shorter = shorten_prompt(e.obj, encode, limit)
        if shorter is not None:
            report.prompt_cut += 1
            report.prompt_tokens += len(e.ids) - len(shorter[0])
            return shorter
        # no user text to cut, or the completion alone is too long: all the user text goes, then the end
        report.completion_cut += 1
        bare = without_user_text(e.obj)
        ids, targets = encode(bare) if bare is not None else (e.ids, e.targets)
        return ids[:limit], targets[:limit]
    report.end_cut += 1
    report.end_tokens += len(e.ids) - limit
    return e.ids[:limit], e.targets[:limit]


def load_examples(
    path: Path, tok: Tokenizer, max_length: int, on_long: str = "truncate-prompt", use_chat: bool = True
) -> list[Example]:
    """Tokenize a JSONL file, each example within `max_length` tokens (see `fit_examples`)."""
    return fit_examples(encode_file(path, tok, use_chat), tok, max_length, on_long, use_chat)[0]


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, S] right-padded
    targets: torch.Tensor  # [B, S] bool: predict tokens[b, s] from the prefix before it
    n_tokens: int  # real (unpadded) tokens


def collate(examples: list[Example], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Right-padded tensors of the examples, made on the CPU and moved to `device` (the model's) once."""
    width = max(len(e) for e in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        tokens[i, : len(e)] = torch.tensor(e.ids)
        targets[i, : len(e)] = torch.tensor(e.targets)
    return Batch(tokens.to(device), targets.to(device), sum(len(e) for e in examples))


def bucketed_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    """Batches of similar length (little padding), in a shuffled order that depends on seed and epoch."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    # sort within windows of 50 batches: lengths alike inside a batch, order still random across them
    window = batch_size * 50
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: len(examples[i]))
        batches += [[examples[i] for i in chunk[b : b + batch_size]] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
