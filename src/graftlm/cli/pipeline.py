"""`graftlm pipeline`: keep every adapter of a spec fresh (run, status, notify, worker, jobs)."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from graftlm.cli.options import add_placement, placement_from
from graftlm.cli.verbs import Verbs
from graftlm.errors import GraftlmError
from graftlm.pipeline.queue import ALL
from graftlm.pipeline.run import Outcome, Pipeline
from graftlm.pipeline.spec import SpecError, load_spec
from graftlm.pipeline.work import executor_for
from graftlm.pipeline.worker import Worker, queue_of, targets_for_path

console = Console(highlight=False)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="retrain, evaluate, gate and publish every stale adapter of a spec",
        description=(
            "Keep the adapters listed in a spec (adapters.toml) fresh: an adapter is stale when its data, the "
            "base model, its settings or its parent adapter changed, or it has no version yet. A run retrains "
            "each stale adapter, scores it, the base model and the current prod version on its test split, "
            "publishes it to the registry, and moves prod to it only if it passes its gate."
        ),
    )
    verb = Verbs(p, _add_spec).add

    v = verb("run", "retrain, evaluate, gate and publish the stale adapters", _run)
    v.add_argument("--only", action="append", default=[], metavar="NAME", help="consider only this adapter")
    v.add_argument("--force", action="store_true", help="retrain even adapters that are fresh")
    v.add_argument("--no-wait", action="store_true", help="fail at once if another run is going on")
    v.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report as JSON")
    add_placement(v)
    g = v.add_argument_group("executor (where training and scoring run; publishing stays here)")
    g.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: this process, one adapter after another; ray: each adapter a Ray task, in parallel "
        "(pip install 'graftlm[ray]') (default: local)",
    )
    g.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://HOST:10001); default: a new one")
    g.add_argument("--task-cpus", type=float, default=1.0, help="CPUs each Ray task asks for (default: 1)")
    g.add_argument("--task-gpus", type=float, default=0.0, help="GPUs each Ray task asks for (default: 0)")
    verb("status", "say which adapters are stale and why, without running anything", _status)
    v = verb("notify", "queue a run: a data source says it changed", _notify)
    who = v.add_mutually_exclusive_group(required=True)
    who.add_argument("--adapter", action="append", default=[], metavar="NAME", help="this adapter's data changed")
    who.add_argument("--path", type=Path, default=None, help="this data file or folder changed")
    who.add_argument("--all", action="store_true", help="check every adapter (e.g. the base model changed)")
    v.add_argument("--reason", default="notified", help="a word on what changed (kept with the job)")
    v.add_argument("--max-attempts", type=int, default=3, help="tries before the job fails for good (default: 3)")
    v = verb("worker", "run queued jobs, retrying failures with back-off", _worker)
    v.add_argument("--once", action="store_true", help="stop when no job is due instead of waiting for more")
    v.add_argument("--watch", action="store_true", help="also queue a job when a data file changes")
    v.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default: 2)")
    v.add_argument("--lease", type=float, default=120.0, help="seconds a job stays claimed without a heartbeat")
    v.add_argument("--backoff", type=float, default=10.0, help="first retry delay in seconds, doubling (default: 10)")
    add_placement(v)
    v = verb("jobs", "list the queue's jobs", _jobs)
    v.add_argument("--state", choices=("queued", "running", "done", "failed"), default=None)


def _add_spec(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", type=Path, default=Path("adapters.toml"), help="spec file (default: adapters.toml)")


def _score(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _run(args: argparse.Namespace) -> int:
    if args.address and args.executor != "ray":
        raise GraftlmError("--address is for --executor ray")
    spec = load_spec(args.spec)
    executor = executor_for(args.executor, args.address, args.task_cpus, args.task_gpus)
    outcomes = Pipeline(spec, placement_from(args)).run(
        args.only or None, force=args.force, wait=not args.no_wait, executor=executor
    )
    console.print(f"[bold]pipeline run[/] of {spec.path} ({len(outcomes)} adapters)")
    for o in outcomes:
        print_outcome(o)
    if args.json is not None:
        args.json.write_text(json.dumps([o.as_dict() for o in outcomes], indent=2))
    return 1 if any(o.action == "failed" for o in outcomes) else 0


def print_outcome(o: Outcome) -> None:
    colour = {"fresh": "green", "trained": "cyan", "failed": "red", "skipped": "yellow"}[o.action]
    head = f"[bold]{o.name}[/] [{colour}]{o.action}[/]"
    if o.version is not None:
        head += f"  version {o.version}"
    if o.score is not None:
        head += f"  score {_score(o.score)} (base {_score(o.base_score)}"
        head += f", prod v{o.prod_before} {_score(o.prod_score)})" if o.prod_before is not None else ", no prod)"
    head += f"  prod: {o.prod_before or '-'} -> {o.prod_after or '-'}  [{o.seconds:.0f} s]"
    console.print(head)
    console.print(f"    why: {'; '.join(o.reasons)}")
    if o.passed is not None:
        console.print(f"    gate {'[green]passed[/]' if o.passed else '[red]failed[/]'}: {'; '.join(o.gate)}")
    if o.error:
        console.print(f"    [red]error[/]: {o.error}")


def _status(args: argparse.Namespace) -> int:
    pipeline = Pipeline(load_spec(args.spec))
    table = Table(title=f"adapters of {args.spec}")
    for col in ("adapter", "state", "why", "last version", "prod"):
        table.add_column(col)
    for a in pipeline.spec.ordered():
        last = pipeline.last_run(a.name)
        prod = pipeline.registry.aliases(a.name).get((a.name, "prod"))
        try:
            reasons = pipeline.status(a).reasons
            state = "[yellow]stale[/]" if reasons else "[green]fresh[/]"
        except GraftlmError as e:  # e.g. its parent has no version yet: say so, go on with the others
            state, reasons = "[red]cannot run[/]", [str(e)]
        table.add_row(a.name, state, "; ".join(reasons) or "-", str(last.version) if last else "-", str(prod or "-"))
    console.print(table)
    return 0


def _notify(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.all:
        targets = [ALL]
    elif args.path is not None:
        targets = targets_for_path(spec, args.path)
        if not targets:
            raise SpecError(f"no adapter in {args.spec} reads {args.path}")
    else:
        targets = [spec.adapter(n).name for n in args.adapter]
    queue = queue_of(spec)
    for t in targets:
        job = queue.push(t, args.reason, args.max_attempts)
        console.print(f"queued job {job}: {t} ({args.reason})")
    return 0


def _worker(args: argparse.Namespace) -> int:
    w = Worker(args.spec, args.lease, args.backoff, place=placement_from(args))
    ran = w.run(once=args.once, watch=args.watch, interval=args.interval)
    console.print(f"ran {ran} jobs")
    return 0


def _jobs(args: argparse.Namespace) -> int:
    table = Table()
    for col in ("job", "target", "state", "attempts", "reason", "updated", "error"):
        table.add_column(col)
    for j in queue_of(load_spec(args.spec)).jobs(args.state):
        when = datetime.datetime.fromtimestamp(j.updated).strftime("%H:%M:%S")
        table.add_row(str(j.id), j.target, j.state, f"{j.attempts}/{j.max_attempts}", j.reason, when, j.error or "")
    console.print(table)
    return 0
