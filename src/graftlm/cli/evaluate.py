"""`graftlm eval`: grade the base model and any number of adapters on a test file, in one engine pass."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from graftlm.cli.fields import add_fields, build
from graftlm.cli.options import add_model, add_placement, placement_from
from graftlm.errors import GraftlmError
from graftlm.eval.answers import Contestant, answer_all
from graftlm.eval.grade import Case
from graftlm.eval.judge import JudgeConfig, JudgeUnavailableError
from graftlm.eval.metrics import METRICS
from graftlm.eval.runner import Task
from graftlm.eval.safety import PROMPTS
from graftlm.eval.suite import GRADERS, HEADLINE, TEST, Plan, load_sets, run_suite
from graftlm.lora.peft_io import CONFIG_FILE

console = Console(highlight=False)
BASE = "base"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="grade the base model and adapters on a test file: metrics, checks, a judge, side by side, safety",
        description=(
            "Generate greedy answers for every line of a test JSONL file (chat 'messages' ending with the "
            "reference answer, or 'prompt'/'completion'; lines may list verifiable 'checks') from the base model "
            "and each --adapter, all in one batched engine pass, then grade them. Graders: the task metrics "
            f"({', '.join(METRICS)}), 'instructions' (each line's checks), 'rubric' (a judge grades Apple's five "
            "summary dimensions good/neutral/poor), 'safety' (a judge grades answers to adversarial prompts). "
            "--compare asks the judge to pick between two models' answers, each pair twice with positions swapped. "
            "The metric, answer length and default graders come from task.json beside the data."
        ),
    )
    p.add_argument("--data", type=Path, default=None, help="test JSONL file")
    p.add_argument("--adapter", type=Path, action="append", default=[], help="adapter folder to grade (repeatable)")
    p.add_argument("--no-base", action="store_true", help="grade only the adapters")
    add_model(p, runtime=False)
    add_placement(p)
    p.add_argument("--metric", choices=sorted(METRICS), default=None, help="task metric (default: task.json)")
    p.add_argument(
        "--grader",
        action="append",
        default=[],
        choices=GRADERS,
        metavar="NAME",
        help=f"grader to run (repeatable): {', '.join(GRADERS)} (default: task.json's graders and the metric)",
    )
    p.add_argument("--rubric", type=Path, action="append", default=[], metavar="FILE", help="a judge rubric (TOML)")
    p.add_argument(
        "--compare",
        default=None,
        metavar="MODEL_OR_ADAPTER",
        help="side by side: every graded model against this one ('base', an adapter folder or another model)",
    )
    p.add_argument("--safety-prompts", type=Path, default=PROMPTS, metavar="FILE", help="adversarial prompts (JSONL)")
    p.add_argument("-o", "--out", type=Path, default=None, help="write every answer, grade and reason here (JSON)")
    p.add_argument("-n", "--max-tokens", type=int, default=None, help="answer length (default: task.json or 64)")
    p.add_argument("--limit", type=int, default=0, help="grade only the first N lines")
    p.add_argument("--batch", type=int, default=32, help="answers generated together (default: 32)")
    p.add_argument("--show", type=int, default=0, help="print the first N answers beside their references")
    p.add_argument("--force", action="store_true", help="load an adapter trained on another base model")
    add_fields(p.add_argument_group("judge"), JudgeConfig)
    p.set_defaults(run=run)


def _judge(args: argparse.Namespace) -> JudgeConfig | None:
    if not args.judge_url and not args.judge_model:
        return None
    return build(JudgeConfig, args, api_key=args.judge_key or os.environ.get("GRAFTLM_JUDGE_KEY", ""))


def _plan(args: argparse.Namespace, task: Task | None, compare: str | None) -> Plan:
    metric = args.metric or (task.metric if task else None)
    graders = list(args.grader) or list(task.graders if task else ())
    rubrics = list(args.rubric) or ([task.rubric] if task and task.rubric and not args.grader else [])
    if metric and (not args.grader or metric in args.grader) and metric not in graders:
        graders.insert(0, metric)
    if not graders and not rubrics and compare is None:
        raise GraftlmError(f"nothing to grade: no task.json beside {args.data}; pass --metric or --grader")
    max_new = args.max_tokens or (task.max_new_tokens if task else 64)
    return Plan(tuple(graders), tuple(rubrics), _judge(args), compare, args.safety_prompts, max_new, args.limit)


def _contestants(args: argparse.Namespace) -> tuple[list[Contestant], str | None, str | None]:
    """The models graded on the base model's engine, the compare target's label, and another base model
    to load for it (None when the target is the base or an adapter)."""
    found: list[Contestant] = [] if args.no_base else [Contestant(BASE)]
    for path in args.adapter:
        label = path.name if all(c.label != path.name for c in found) else str(path)
        found.append(Contestant(label, path))
    target, other_model = args.compare, None
    if target == BASE:
        if all(c.label != BASE for c in found):
            found.insert(0, Contestant(BASE))
    elif target is not None and (Path(target) / CONFIG_FILE).is_file():
        match = [c for c in found if c.adapter is not None and c.adapter.resolve() == Path(target).resolve()]
        if match:
            target = match[0].label
        else:
            found.append(Contestant(f"{Path(target).name} (compared)", Path(target)))
            target = found[-1].label
    elif target is not None:
        other_model = target
    if not found:
        raise GraftlmError("--no-base needs --adapter")
    return found, target, other_model


def run(args: argparse.Namespace) -> int:
    task = Task.beside(args.data) if args.data is not None else None
    contestants, target, other_model = _contestants(args)
    plan = _plan(args, task, target)
    sets = load_sets(plan, args.data)  # bad data or checks fail here, before a model loads
    place = placement_from(args)
    model, tok, source = place.load(args.model)

    def other(sets: dict[str, list[Case]], max_new: dict[str, int]) -> dict[str, dict[str, list[str]]]:
        m, t, _ = place.load(other_model)  # any model: only its answers are compared
        return answer_all(m, t, [Contestant(other_model)], sets, max_new, args.batch, label="answering (compared)")

    meta = {
        "task": task.name if task else (args.data.stem if args.data else "safety"),
        "data": str(args.data) if args.data else None,
        "model": source.name,
    }
    try:
        more = other if other_model else None
        doc = run_suite(model, tok, contestants, plan, sets, meta, args.out, args.batch, args.force, more, _announce)
    except JudgeUnavailableError:
        if args.out is not None:
            console.print(f"[yellow]the results graded so far are in {args.out}[/]", soft_wrap=True)
        raise
    _show(doc, args.show)
    if args.out is not None:
        console.print(f"every answer, grade and reason: {args.out}", soft_wrap=True)
    return 0


def _announce(message: str) -> None:
    console.print(f"[dim]{message}[/]")


def _figure(name: str, f: dict[str, float]) -> str:
    if "good_rate" in f:
        return f"{f['good_rate']:.2f} / {f['neutral_rate']:.2f} / {f['poor_rate']:.2f}"
    key = HEADLINE.get(name, name if name in f else "score")
    low, high = f.get(f"{key}_low"), f.get(f"{key}_high")
    return f"{f[key]:.3f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else "")


def _show(doc: dict[str, Any], show: int) -> None:
    graders = list(dict.fromkeys(n for c in doc["contestants"].values() for n in c["graders"]))
    table = Table(title=f"{doc['task']}: {doc['data'] or 'safety prompts'}")
    table.add_column("model")
    for name in graders:
        what = "good / neutral / poor" if name.startswith("rubric") else HEADLINE.get(name, name)
        table.add_column(f"{name}\n{what}" if what != name else name, justify="right")
    for label, c in doc["contestants"].items():
        table.add_row(label, *(_figure(n, c["graders"][n]["figures"]) if n in c["graders"] else "" for n in graders))
    console.print(table)
    if doc["comparisons"]:
        sbs = Table(title="side by side (each pair judged twice, positions swapped; 95% intervals)")
        for col in ("model", "against", "win", "tie", "loss", "same after swap", "agrees with metric", "unjudged"):
            sbs.add_column(col, justify="left" if col in ("model", "against") else "right")
        for cmp in doc["comparisons"]:
            f = cmp["figures"]
            cells = [
                f"{f[k]:.2f} [{f[k + '_low']:.2f}, {f[k + '_high']:.2f}]" for k in ("win_rate", "tie_rate", "loss_rate")
            ]
            agree = f"{f['metric_agreement']:.2f} of {f['metric_agreement_n']:.0f}" if "metric_agreement" in f else "-"
            sbs.add_row(cmp["model"], cmp["other"], *cells, f"{f['consistency']:.2f}", agree, f"{f['failed_rate']:.2f}")
        console.print(sbs)
    for label, c in doc["contestants"].items():
        for i, text in enumerate(c["answers"].get(TEST, [])[:show]):
            ref = doc["sets"][TEST][i]["reference"]
            console.print(f"[dim]{label}[/] {text!r}\n[dim]reference[/] {ref!r}\n")
