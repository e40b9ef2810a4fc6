"""Answers from many models at once: every (contestant, prompt) pair goes through one serving engine,
which batches rows of different adapters together, so scoring a dozen adapters costs one pass.

A contestant is the base model or the base with one adapter. Answers are greedy and, since the engine's
per-row adapters compute the same function as the adapter merged into the weights, the same text the
merged model gives (tests/engine check this), up to float rounding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from graftlm.engine.adapter_finder import Source
from graftlm.engine.engine import Engine, EngineConfig
from graftlm.engine.offline import Job, run_jobs
from graftlm.engine.sampling import SamplingParams
from graftlm.errors import ConfigError
from graftlm.eval.grade import Case
from graftlm.lora.peft_io import CONFIG_FILE
from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Contestant:
    label: str
    adapter: Path | None = None  # None: the base model alone


def adapter_rank(path: Path) -> int:
    try:
        return int(json.loads((path / CONFIG_FILE).read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not an adapter folder (no readable {CONFIG_FILE}: {e})") from None


def build_engine(
    model: Llama,
    tok: Tokenizer,
    contestants: Sequence[Contestant],
    max_batch: int = 32,
    force: bool = False,
    max_len: int = 2048,
) -> Engine:
    """An engine able to hold every contestant's adapter at once, adapters kept in float32 (exact)."""
    ranks = [adapter_rank(c.adapter) for c in contestants if c.adapter is not None]
    config = EngineConfig(
        max_batch=max_batch,
        max_len=max_len,
        max_rank=max(ranks, default=8),
        adapter_dtype="float32",
        adapter_cache_mb=4096,
        max_waiting=2**31,  # every answer is queued up front
        max_queued_per_tenant=2**31,
    )
    return Engine(model, tok, config, force=force)


def answer_all(
    model: Llama,
    tok: Tokenizer,
    contestants: Sequence[Contestant],
    sets: dict[str, Sequence[Case]],
    max_new_tokens: dict[str, int],
    max_batch: int = 32,
    force: bool = False,
    label: str = "answering",
) -> dict[str, dict[str, list[str]]]:
    """`answer` on an engine sized for these prompts (KV rows as long as the longest prompt and answer),
    stopped afterwards."""
    prompts = {s: [tok.encode_chat(c.messages) for c in cases] for s, cases in sets.items()}
    longest = max((len(p) + max_new_tokens[s] for s, ps in prompts.items() for p in ps), default=1)
    engine = build_engine(model, tok, contestants, max_batch, force, max_len=longest)
    try:
        return answer(engine, contestants, prompts, max_new_tokens, label)
    finally:
        engine.stop()


def answer(
    engine: Engine,
    contestants: Sequence[Contestant],
    prompts: dict[str, list[list[int]]],
    max_new_tokens: dict[str, int],
    label: str = "answering",
) -> dict[str, dict[str, list[str]]]:
    """answers[contestant label][set name][i]: every contestant's greedy answer to every prompt (token ids)
    of every set, in one engine pass; a request that fails raises its error after the others finish."""
    keys, jobs = [], []
    for k, c in enumerate(contestants):
        adapters = ((Source(f"eval{k}-{c.adapter.name}", "", c.adapter), 1.0),) if c.adapter is not None else ()
        for s, ps in prompts.items():
            params = SamplingParams(max_new_tokens=max_new_tokens[s])
            for i, prompt in enumerate(ps):
                keys.append((c.label, s, i))
                jobs.append(Job(prompt, params, adapters))
    out = {c.label: {s: [""] * len(ps) for s, ps in prompts.items()} for c in contestants}
    for (who, s, i), done in zip(keys, run_jobs(engine, jobs, label), strict=True):
        out[who][s][i] = done.text.strip()
    return out
