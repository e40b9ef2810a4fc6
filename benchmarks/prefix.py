"""Prefix cache: time to first token when requests share a long prompt prefix, with and without the cache.

Workload: 64 requests to the serving engine, each a few-shot prompt: the summarize task's instruction
with few-shot examples from its training split (a shared prefix of about 300 tokens), then its own
input from the test split. All are submitted at once, greedy, `--new-tokens` tokens each. The same
requests run with the prefix cache off and on, in turn for `--rounds` rounds (host drift falls on both);
the answers of the two sides must be identical.

Prints the shared prefix's length, time to first token (mean, p50, p90), the total time, the prompt
tokens computed, and the ratio of mean time to first token (off / on).

    python benchmarks/prefix.py [--requests 64] [--shots 3] [--new-tokens 8] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from graftlm.engine.engine import Engine, EngineConfig
from graftlm.engine.prefix_cache import PrefixCache
from graftlm.engine.request import Output
from graftlm.engine.sampling import SamplingParams
from graftlm.loading import catalog

ROOT = Path(__file__).resolve().parents[1]
console = Console(width=120)


def workload(tok: object, requests: int, shots: int) -> tuple[list[list[int]], int]:
    """The prompts (shared few-shot prefix + own input) and the shared prefix's length in tokens."""
    task = ROOT / "examples" / "summarize"
    train = [json.loads(line)["messages"] for line in (task / "train.jsonl").read_text().splitlines()[:shots]]
    test = [json.loads(line)["messages"] for line in (task / "test.jsonl").read_text().splitlines()[:requests]]
    shots_msgs = [m for ex in train for m in ex]
    prompts = [tok.encode_chat([*shots_msgs, t[0]]) for t in test]  # type: ignore[attr-defined]
    shared = 0
    while all(len(p) > shared and p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    return prompts, shared


def run(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], float, list[list[int]]]:
    """Submit every prompt at once; (time to first token of each, total seconds, each answer's tokens)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    first: list[float | None] = [None] * len(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    t0 = time.perf_counter()

    def sink(i: int):  # type: ignore[no-untyped-def]
        def put(o: Output) -> None:
            if o.token is not None:
                if first[i] is None:
                    first[i] = time.perf_counter() - t0
                tokens[i].append(o.token)
            if o.finish_reason or o.error:
                done[i].set()

        return put

    for i, p in enumerate(prompts):
        engine.submit(p, params, (), sink(i))
    for d in done:
        d.wait()
    return [f or 0.0 for f in first], time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=catalog.DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--shots", type=int, default=3, help="training examples before each input (3: a 280-token prefix)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, source = catalog.load(args.model)
    prompts, shared = workload(tok, args.requests, args.shots)
    console.print(
        f"{source.name}, {args.threads} threads: {len(prompts)} requests, prompts of {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens sharing the first {shared}, {args.new_tokens} new tokens each"
    )
    results: dict[str, list[tuple[list[float], float, int]]] = {"off": [], "on": []}
    answers: dict[str, list[list[int]]] = {}
    # one engine (it installs adapter slots in the model); each run starts with an empty cache or none
    engine = Engine(model, tok, EngineConfig(max_len=1024)).start()
    try:
        for _ in range(args.rounds):
            for side in ("off", "on"):
                engine.prefix = PrefixCache(256 * 2**20) if side == "on" else None
                before = engine.prefill_tokens
                ttft, total, out = run(engine, prompts, args.new_tokens)
                results[side].append((ttft, total, engine.prefill_tokens - before))
                answers.setdefault(side, out)
                console.print(f"prefix cache {side}: mean time to first token {statistics.mean(ttft):.2f} s")
    finally:
        engine.stop()
    table = Table(title=f"time to first token, {len(prompts)} requests submitted at once (medians over rounds)")
    for col in ("prefix cache", "TTFT mean s", "TTFT p50 s", "TTFT p90 s", "total s", "prompt tokens computed"):
        table.add_column(col, justify="left" if col == "prefix cache" else "right")
    means = {}
    for side, runs in results.items():
        means[side] = statistics.median(statistics.mean(r[0]) for r in runs)
        p50 = statistics.median(statistics.median(r[0]) for r in runs)
        p90 = statistics.median(sorted(r[0])[int(0.9 * len(r[0]))] for r in runs)
        total = statistics.median(r[1] for r in runs)
        table.add_row(side, f"{means[side]:.2f}", f"{p50:.2f}", f"{p90:.2f}", f"{total:.1f}", f"{runs[0][2]}")
    console.print(table)
    same = sum(a == b for a, b in zip(answers["off"], answers["on"], strict=True))
    ratio = means["off"] / means["on"]
    console.print(f"mean time to first token, off / on: {ratio:.2f}x; answers identical: {same} of {len(prompts)}")


if __name__ == "__main__":
    main()
