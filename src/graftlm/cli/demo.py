"""`graftlm demo`: the default model answering prompts, then an example task adapter against the base."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from graftlm.cli.demo_server import serve_part
from graftlm.cli.options import add_model
from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams
from graftlm.eval.runner import Task, evaluate
from graftlm.fileio import file_sha256
from graftlm.loading import catalog
from graftlm.loading.merged import load_merged
from graftlm.lora.config import LoraConfig
from graftlm.train.sft import RECORD_FILE, DataSpec, train_adapter
from graftlm.train.trainer import TrainConfig

console = Console(highlight=False)
log = logging.getLogger(__name__)

# optimizer steps of a quick demo adapter: enough to beat the base model clearly on its task, and a
# demo under 10 minutes on 2 cores (benchmarks/README.md, "Quick demo steps")
QUICK_STEPS = 24

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Rewrite more politely: send me the report now.",
    "Give three tips for writing a clear email.",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the default model, then a task adapter against the base",
        description=(
            "Load the embedded default model (converting its GGUF on first use) and answer a few prompts, "
            "printing tokens/s. Then train the example task adapters (or reuse them when their data and base "
            "model are unchanged), score one task's base and adapter side by side on its test split, and "
            "finally serve every adapter behind the OpenAI-compatible API and send it concurrent requests."
        ),
    )
    add_model(p, runtime=False)
    p.add_argument("-n", "--max-tokens", type=int, default=64, help="most new tokens per answer")
    p.add_argument("--task", default="summarize", help="example task under --examples (default: summarize)")
    p.add_argument("--examples", type=Path, default=Path("examples"), help="example tasks folder")
    p.add_argument("--adapters", type=Path, default=Path("adapters"), help="where trained adapters go")
    p.add_argument("--limit", type=int, default=48, help="test examples to score (default: 48)")
    p.add_argument("--no-adapter", action="store_true", help="only the base model part")
    p.add_argument("--no-serve", action="store_true", help="skip the serving part")
    p.add_argument(
        "--full",
        action="store_true",
        help=f"train each adapter for its task's whole schedule (one epoch) instead of the first {QUICK_STEPS} "
        "steps: better adapters, about half an hour on 2 cores (make demo-full)",
    )
    p.set_defaults(run=run)


def base_part(model_name: str, max_tokens: int) -> None:
    t0 = time.perf_counter()
    model, tok, source = catalog.load(model_name)
    console.print(
        f"[bold]{source.name}[/]: {model.num_parameters() / 1e6:.1f}M parameters, "
        f"loaded in {time.perf_counter() - t0:.1f} s from {source.origin}"
    )
    gen = Generator(model, tok)
    params = SamplingParams(max_new_tokens=max_tokens)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in PROMPTS]
    for question, prompt in zip(PROMPTS, prompts, strict=True):
        console.print(f"\n[bold green]> {question}[/]")
        count, t1 = 0, time.perf_counter()
        for count, ev in enumerate(gen.steps([prompt], params), 1):  # noqa: B007 (count is used after)
            console.print(ev.delta, end="", markup=False)
        dt = time.perf_counter() - t1
        console.print(f"\n[dim]{count} tokens, {count / dt:.1f} tokens/s (prompt {len(prompt)} tokens)[/]")
    t1 = time.perf_counter()
    outs = gen.generate(prompts, params)
    dt = time.perf_counter() - t1
    total = sum(len(o.token_ids) for o in outs)
    console.print(f"\n[bold]batch of {len(prompts)}:[/] {total} tokens in {dt:.1f} s, {total / dt:.1f} tokens/s")


def ensure_adapter(model_name: str, task_dir: Path, task: Task, out: Path, full: bool) -> None:
    """Train the task's adapter unless one trained on the same data and base model (and at least as long)
    is already there. Quick: the first `QUICK_STEPS` steps of the task's schedule; full: all of it."""
    train_file = task_dir / "train.jsonl"
    record = out / RECORD_FILE
    if record.is_file():
        r = json.loads(record.read_text())
        same_data = r["data"]["train"]["sha256"] == file_sha256(train_file)
        model, _, _ = catalog.load(model_name)
        long_enough = not full or r["config"]["train"].get("max_steps", 0) == 0
        if same_data and long_enough and r["base_model"]["fingerprint"] == model.fingerprint():
            console.print(f"reusing {out} (trained in {r['metrics']['seconds']:.0f} s on unchanged data)")
            return
    config = TrainConfig(**task.train)  # type: ignore[arg-type]
    if not full:
        config = replace(config, max_steps=QUICK_STEPS, eval_every=0)
    how = "its whole schedule" if full else f"{QUICK_STEPS} steps (--full: the whole schedule)"
    console.print(f"training {out} on {train_file}, {how}")
    train_adapter(model_name, DataSpec(train_file, task_dir / "valid.jsonl"), out, LoraConfig(), config)


def adapter_part(model_name: str, task_dir: Path, out: Path, limit: int, full: bool) -> None:
    test = task_dir / "test.jsonl"
    task = Task.beside(test)
    if task is None:
        console.print(f"[yellow]no example task at {task_dir}; skipping the adapter part[/]")
        return
    console.rule(f"task adapter: {task.name}")
    ensure_adapter(model_name, task_dir, task, out, full)
    results = {}
    for label, adapter in (("base", None), ("adapter", out)):
        model, tok, _ = load_merged(model_name, adapter)
        results[label] = evaluate(Generator(model, tok), test, task, limit=limit, label=f"scoring {label}")
    for (b_pred, ref, b_s), (a_pred, _, a_s) in list(
        zip(results["base"].predictions, results["adapter"].predictions, strict=True)
    )[:3]:
        console.print(
            f"\n[dim]reference[/]  {ref}\n[dim]base ({b_s:.2f})[/] {b_pred}\n[bold]adapter ({a_s:.2f})[/] {a_pred}",
            markup=True,
        )
    table = Table(title=f"{task.name} on {limit} test examples")
    for col in ("model", task.metric, "seconds"):
        table.add_column(col)
    for label, r in results.items():
        table.add_row(label, f"{r.score:.3f}", f"{r.seconds:.0f}")
    console.print(table)


def example_tasks(examples: Path) -> list[str]:
    return sorted(p.parent.name for p in examples.glob("*/task.json") if (p.parent / "train.jsonl").is_file())


def run(args: argparse.Namespace) -> int:
    base_part(args.model, args.max_tokens)
    if args.no_adapter:
        return 0
    adapter_part(args.model, args.examples / args.task, args.adapters / args.task, args.limit, args.full)
    if args.no_serve:
        return 0
    tasks = example_tasks(args.examples)
    for name in tasks:  # the server shows every example adapter: train the ones still missing
        task_dir = args.examples / name
        ensure_adapter(args.model, task_dir, Task.beside(task_dir / "test.jsonl"), args.adapters / name, args.full)
    serve_part(args.model, args.examples, args.adapters, tasks)
    return 0
