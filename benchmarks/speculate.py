"""Speculation at batch 1 on the example tasks, against plain decoding of the same model.

For each task (proofread, extract, summarize) the base model with the task's adapter merged in answers
the first `--prompts` test prompts greedily, float32, `--threads` threads; each prompt is decoded plainly
and with prompt-lookup speculation in turn (the sides alternate, so host drift falls on both), and with
`--draft MODEL` also with that draft model proposing (`--draft-tokens` a step; the draft is shared by
the tasks, without their adapters, as the server would share it). Prints tokens/s of each side, the
ratio, the draft acceptance, tokens per forward, and how many answers differ (0 expected).

    python benchmarks/speculate.py --adapters adapters [--prompts 16] [--spec-tokens 7] [--threads 2]
        [--draft /tmp/pal/mix --draft-tokens 4]

`--engine` instead measures the serving engine (`graftlm serve --speculate ngram`): the tasks' prompts
sent to one engine with every task's adapter (not merged), `--concurrency` at a time, with speculation
off and on in turn; prints tokens/s, the ratio, acceptance per adapter and whether the answers match.

    python benchmarks/speculate.py --adapters adapters --engine [--concurrency 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from graftlm.engine.adapter_finder import Source
from graftlm.engine.engine import Engine, EngineConfig
from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams
from graftlm.engine.speculate import (
    SPEC_TOKENS,
    ModelDrafter,
    NgramDrafter,
    SpecStats,
    check_draft,
    speculative_steps,
)
from graftlm.loading import catalog
from graftlm.loading.merged import load_merged

console = Console(soft_wrap=True)
TASKS = ("proofread", "extract", "summarize")


def prompts_of(task: Path, n: int) -> tuple[list[list[dict[str, str]]], int]:
    rows = [json.loads(line) for line in (task / "test.jsonl").read_text().splitlines()[:n]]
    max_new = int(json.loads((task / "task.json").read_text()).get("max_new_tokens", 64))
    return [r["messages"][:-1] for r in rows], max_new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=Path, required=True, help="folder with proofread/, extract/, summarize/")
    ap.add_argument("--examples", type=Path, default=Path("examples"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--spec-tokens", type=int, default=SPEC_TOKENS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft", default=None, help="also speculate with this draft model (as -m names a model)")
    ap.add_argument("--draft-tokens", type=int, default=4, help="drafts a step with --draft")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--engine", action="store_true", help="the serving engine, speculation off and on")
    ap.add_argument("--concurrency", type=int, default=1, help="--engine: requests in flight at once")
    args = ap.parse_args()
    if args.engine:
        torch.set_num_threads(args.threads)
        engine_sides(args)
        return
    torch.set_num_threads(args.threads)
    table = Table(title=f"batch 1, greedy, float32, {args.threads} threads, {args.prompts} prompts per task")
    cols = ("task", "drafts", "plain tok/s", "speculative tok/s", "ratio", "accepted", "tokens/forward", "differ")
    for col in cols:
        table.add_column(col, justify="left" if col in ("task", "drafts") else "right")
    draft = catalog.load(args.draft)[:2] if args.draft else None
    for task in args.tasks.split(","):
        model, tok, _ = load_merged(args.model, args.adapters / task)
        gen = Generator(model, tok)
        chats, max_new = prompts_of(args.examples / task, args.prompts)
        params = SamplingParams(max_new_tokens=max_new)
        gen.generate([tok.encode_chat(chats[0])], params)  # warm-up
        # one drafter per task and side, as a server keeps one per adapter: it remembers the answers before
        sides: dict[str, tuple[int, object]] = {"prompt lookup": (args.spec_tokens, NgramDrafter())}
        if draft is not None:
            check_draft(model, tok, *draft)
            sides[f"draft {Path(args.draft).name}"] = (args.draft_tokens, ModelDrafter(draft[0]))
        plain_s, plain_n = 0.0, 0
        spent = dict.fromkeys(sides, 0.0)
        made = dict.fromkeys(sides, 0)
        differ = dict.fromkeys(sides, 0)
        stats = {side: SpecStats() for side in sides}
        for chat in chats:
            ids = tok.encode_chat(chat)
            t0 = time.perf_counter()
            want = gen.generate([ids], params)[0].token_ids
            plain_s += time.perf_counter() - t0
            plain_n += len(want)
            for side, (k, drafter) in sides.items():
                t0 = time.perf_counter()
                got = [ev.token for ev in speculative_steps(model, tok, ids, params, k, stats[side], drafter)]
                spent[side] += time.perf_counter() - t0
                got = got[:-1] if got and got[-1] in gen.stop_ids else got  # generate() drops the EOS
                made[side] += len(got)
                differ[side] += got != want
        a = plain_n / plain_s
        for side in sides:
            b = made[side] / spent[side]
            st = stats[side]
            table.add_row(
                task,
                side,
                f"{a:.1f}",
                f"{b:.1f}",
                f"{b / a:.2f}x",
                f"{st.acceptance:.0%}",
                f"{st.tokens_per_forward:.2f}",
                str(differ[side]),
            )
            console.print(f"{task}, {side}: plain {a:.1f} tok/s, speculative {b:.1f} tok/s ({b / a:.2f}x)")
    console.print(table)


def engine_sides(args: argparse.Namespace) -> None:
    """Every task's prompts through one engine holding every task's adapter, speculation off and on."""
    from concurrent.futures import ThreadPoolExecutor

    model, tok, _ = catalog.load(args.model)
    work = []
    for task in args.tasks.split(","):
        chats, max_new = prompts_of(args.examples / task, args.prompts)
        work += [(task, tok.encode_chat(c), SamplingParams(max_new_tokens=max_new)) for c in chats]
    # one engine whose loop runs on this thread, the one that loaded the model (one OpenMP pool: see
    # "Engine thread and malloc"), speculation switched between the sides; clients on other threads
    plain = EngineConfig(max_batch=max(4, args.concurrency))
    spec = dataclasses.replace(plain, speculate="ngram", spec_tokens=args.spec_tokens)
    engine = Engine(model, tok, plain, args.adapters)
    configs = {"plain": plain, "prompt lookup": spec}
    engines = dict.fromkeys(configs, engine)

    def one(engine: Engine, item: tuple[str, list[int], SamplingParams]) -> list[int]:
        task, ids, params = item
        src: Source = engine.cache.resolve(task)
        return [o.token for o in engine.run(ids, params, [(src, 1.0)]) if o.token is not None]

    answers: dict[str, dict[str, list[list[int]]]] = {side: {} for side in engines}
    spent: dict[str, dict[str, float]] = {side: {} for side in engines}
    for task in args.tasks.split(","):
        items = [w for w in work if w[0] == task]
        for side, engine in engines.items():  # the sides alternate task by task
            engine.config = configs[side]
            pool = ThreadPoolExecutor(args.concurrency)
            warm = pool.submit(one, engine, items[0])  # warm-up: the adapter loads
            engine.run_forever(until=warm.done)
            t0 = time.perf_counter()
            futures = [pool.submit(one, engine, it) for it in items]
            engine.run_forever(until=lambda fs=futures: all(f.done() for f in fs))
            spent[side][task] = time.perf_counter() - t0
            answers[side][task] = [f.result() for f in futures]
            pool.shutdown()
    table = Table(title=f"serving engine, {args.concurrency} request(s) at a time, greedy, {args.prompts} prompts")
    for col in ("task", "plain tok/s", "speculative tok/s", "ratio", "accepted", "tokens/forward", "differ"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task in args.tasks.split(","):
        n = [sum(len(a) for a in answers[side][task]) for side in engines]
        a, b = n[0] / spent["plain"][task], n[1] / spent["prompt lookup"][task]
        st = engines["prompt lookup"].cache.stat(task)
        differ = sum(x != y for x, y in zip(answers["plain"][task], answers["prompt lookup"][task], strict=True))
        per_forward = (st.accepted + st.spec_steps) / max(1, st.spec_steps)
        table.add_row(task, f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}x", f"{st.accepted / max(1, st.drafted):.0%}",
                      f"{per_forward:.2f}", str(differ))  # fmt: skip
        console.print(f"{task}: engine plain {a:.1f} tok/s, speculative {b:.1f} tok/s ({b / a:.2f}x)")
    console.print(table)


if __name__ == "__main__":
    main()
