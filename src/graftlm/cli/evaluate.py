"""`graftlm eval`: score the base model, and an adapter, on a task's test file."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from graftlm.cli.options import add_model
from graftlm.engine.generate import Generator
from graftlm.errors import GraftlmError
from graftlm.eval.metrics import METRICS
from graftlm.eval.runner import Task, evaluate
from graftlm.loading.merged import load_merged

console = Console(highlight=False)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model (and an adapter) on a test file",
        description=(
            "Generate greedy answers for every line of a test JSONL file (chat 'messages' ending with the "
            "reference answer, or 'prompt'/'completion') and print the task metric for the base model and, "
            "with --adapter, for the adapter. The metric and answer length come from task.json beside the data "
            "unless given."
        ),
    )
    p.add_argument("--data", type=Path, required=True, help="test JSONL file")
    p.add_argument("--adapter", type=Path, default=None, help="adapter folder to score beside the base model")
    p.add_argument("--no-base", action="store_true", help="score only the adapter")
    add_model(p, runtime=False)
    p.add_argument("--metric", choices=sorted(METRICS), default=None, help="task metric (default: task.json)")
    p.add_argument("-n", "--max-tokens", type=int, default=None, help="answer length (default: task.json or 64)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N lines")
    p.add_argument("--batch", type=int, default=16, help="prompts per batch (default: 16)")
    p.add_argument("--show", type=int, default=0, help="print the first N answers beside their references")
    p.add_argument("--force", action="store_true", help="load an adapter trained on another base model")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    found = Task.beside(args.data)
    metric = args.metric or (found.metric if found else None)
    if metric is None:
        raise GraftlmError(f"no task.json beside {args.data}; pass --metric ({', '.join(METRICS)})")
    task = Task(
        found.name if found else args.data.stem, metric, args.max_tokens or (found.max_new_tokens if found else 64)
    )
    runs = [] if args.no_base else [("base", None)]
    if args.adapter is not None:
        runs.append((f"adapter {args.adapter.name}", args.adapter))
    if not runs:
        raise GraftlmError("--no-base needs --adapter")
    table = Table(title=f"{task.name}: {args.data}")
    for col in ("model", task.metric, "examples", "seconds"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, adapter in runs:
        model, tok, _ = load_merged(args.model, adapter, args.force)
        result = evaluate(Generator(model, tok), args.data, task, args.batch, args.limit, label)
        table.add_row(label, f"{result.score:.3f}", str(result.n), f"{result.seconds:.0f}")
        for pred, ref, score in result.predictions[: args.show]:
            console.print(f"[dim]{label} ({score:.2f})[/] {pred!r}\n[dim]reference[/] {ref!r}\n")
    console.print(table)
    return 0
