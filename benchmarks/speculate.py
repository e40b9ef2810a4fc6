"""Prompt-lookup speculation at batch 1 on the example tasks, against plain decoding of the same model.

For each task (proofread, extract, summarize) the base model with the task's adapter merged in answers
the first `--prompts` test prompts greedily, float32, `--threads` threads; each prompt is decoded plainly
and with speculation in turn (the sides alternate, so host drift falls on both). Prints tokens/s of each
side, the ratio, the draft acceptance, tokens per forward, and how many answers differ (0 expected).

    python benchmarks/speculate.py --adapters adapters [--prompts 16] [--spec-tokens 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams
from graftlm.engine.speculate import SPEC_TOKENS, SpecStats, speculative_steps
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(title=f"batch 1, greedy, float32, {args.threads} threads, {args.prompts} prompts per task")
    for col in ("task", "plain tok/s", "speculative tok/s", "ratio", "accepted", "tokens/forward", "answers differ"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task in TASKS:
        model, tok, _ = load_merged(args.model, args.adapters / task)
        gen = Generator(model, tok)
        chats, max_new = prompts_of(args.examples / task, args.prompts)
        params = SamplingParams(max_new_tokens=max_new)
        gen.generate([tok.encode_chat(chats[0])], params)  # warm-up
        plain_s = spec_s = 0.0
        plain_n = spec_n = differ = 0
        stats = SpecStats()
        for chat in chats:
            ids = tok.encode_chat(chat)
            t0 = time.perf_counter()
            want = gen.generate([ids], params)[0].token_ids
            plain_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            got = [ev.token for ev in speculative_steps(model, tok, ids, params, args.spec_tokens, stats)]
            spec_s += time.perf_counter() - t0
            got = got[:-1] if got and got[-1] in gen.stop_ids else got  # generate() drops the EOS
            plain_n += len(want)
            spec_n += len(got)
            differ += got != want
        a, b = plain_n / plain_s, spec_n / spec_s
        table.add_row(
            task,
            f"{a:.1f}",
            f"{b:.1f}",
            f"{b / a:.2f}x",
            f"{stats.acceptance:.0%}",
            f"{stats.tokens_per_forward:.2f}",
            str(differ),
        )
        console.print(f"{task}: plain {a:.1f} tok/s, speculative {b:.1f} tok/s ({b / a:.2f}x)")
    console.print(table)


if __name__ == "__main__":
    main()
