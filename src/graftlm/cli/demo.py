"""`graftlm demo`: load the default model and answer a few prompts, with tokens/s."""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams
from graftlm.model import catalog

console = Console(highlight=False)

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Rewrite more politely: send me the report now.",
    "Give three tips for writing a clear email.",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="answer a few prompts with the default model",
        description=(
            "Load the embedded default model (converting its GGUF on first use), answer a few prompts one "
            "at a time with streaming, then all at once as a batch, printing tokens/s."
        ),
    )
    p.add_argument("-m", "--model", default=catalog.DEFAULT_MODEL, help="model to demo")
    p.add_argument("-n", "--max-tokens", type=int, default=64, help="most new tokens per answer")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model, tok, source = catalog.load(args.model)
    console.print(
        f"[bold]{source.name}[/]: {model.num_parameters() / 1e6:.1f}M parameters, "
        f"loaded in {time.perf_counter() - t0:.1f} s from {source.origin}"
    )
    gen = Generator(model, tok)
    params = SamplingParams(max_new_tokens=args.max_tokens)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in PROMPTS]
    for question, prompt in zip(PROMPTS, prompts, strict=True):
        console.print(f"\n[bold green]> {question}[/]")
        count, t1 = 0, time.perf_counter()
        for ev in gen.steps([prompt], params):
            console.print(ev.delta, end="", markup=False)
            count += 1
        dt = time.perf_counter() - t1
        console.print(f"\n[dim]{count} tokens, {count / dt:.1f} tokens/s (prompt {len(prompt)} tokens)[/]")
    t1 = time.perf_counter()
    outs = gen.generate(prompts, params)
    dt = time.perf_counter() - t1
    total = sum(len(o.token_ids) for o in outs)
    console.print(f"\n[bold]batch of {len(prompts)}:[/] {total} tokens in {dt:.1f} s, {total / dt:.1f} tokens/s")
    return 0
