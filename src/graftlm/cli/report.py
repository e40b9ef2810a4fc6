"""`graftlm report`: an HTML page from evaluation documents, or from a registry adapter's versions."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from graftlm.cli.registry import add_registry
from graftlm.errors import GraftlmError
from graftlm.eval.report import Run, read_run, render
from graftlm.eval.suite import FORMAT
from graftlm.fileio import atomic_write
from graftlm.registry import Registry

console = Console(highlight=False)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="an HTML page of evaluations: figures over versions, grades, side by side, worst examples",
        description=(
            "Write a self-contained HTML page (charts inline, opens offline) from `graftlm eval --out` documents, "
            "in the order given, or from every version of a registry adapter that carries one: figures per "
            "version, good/neutral/poor per rubric dimension, side-by-side win rates with 95% intervals, and the "
            "worst examples with the judge's reasons. The last evaluation is shown in detail."
        ),
    )
    p.add_argument("evals", type=Path, nargs="*", metavar="EVAL.json", help="evaluation documents")
    p.add_argument("--adapter", default=None, metavar="NAME", help="report this registry adapter's versions")
    add_registry(p)
    p.add_argument("-o", "--out", type=Path, default=Path("report.html"), help="page to write (default: report.html)")
    p.add_argument("--title", default=None, help="the page's title")
    p.set_defaults(run=run)


def registry_runs(registry: Registry, name: str) -> list[Run]:
    runs = []
    for v in registry.versions(name):
        doc = registry.evaluation(v)
        if doc is not None and doc.get("format") == FORMAT:
            runs.append(Run(v.ref, doc))
    if not runs:
        raise GraftlmError(f"no version of {name} carries an evaluation (publish with --eval, or run the pipeline)")
    return runs


def run(args: argparse.Namespace) -> int:
    if args.adapter is not None:
        runs = registry_runs(Registry(args.registry, create=False), args.adapter)
    elif args.evals:
        runs = [read_run(p) for p in args.evals]
    else:
        raise GraftlmError("give evaluation documents (EVAL.json ...) or --adapter NAME")
    title = args.title or f"{args.adapter or runs[-1].doc.get('task')}: evaluation"
    atomic_write(args.out, render(runs, title))
    console.print(f"wrote {args.out} ({len(runs)} evaluation(s))", soft_wrap=True)
    return 0
