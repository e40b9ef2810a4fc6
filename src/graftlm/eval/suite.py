"""`graftlm eval`'s run: several models answer a test set (and the safety prompts) in one engine pass,
every grader grades every model's answers, and side-by-side comparisons pit each model against one.

The result is one JSON document (FORMAT) holding every answer, grade, reason and figure; it is written
after each grader, so a judge that goes away part way leaves what was graded on disk (`complete` false,
`error` saying why) before the error reaches the caller.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from graftlm.errors import ConfigError
from graftlm.eval.answers import Contestant, answer_all
from graftlm.eval.checks import InstructionGrader
from graftlm.eval.grade import Case, Grader
from graftlm.eval.judge import Judge, JudgeConfig, JudgeUnavailableError, PartialResults
from graftlm.eval.metrics import METRICS, MetricGrader
from graftlm.eval.preference import SideBySide, metric_agreement, preference_figures
from graftlm.eval.rubric import BUILT_IN, RubricGrader, load_rubric
from graftlm.eval.runner import load_cases
from graftlm.eval.safety import PROMPTS, SafetyGrader, load_prompts
from graftlm.fileio import atomic_write
from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
FORMAT = "graftlm-eval/1"
TEST, SAFETY = "test", "safety"
SAFETY_TOKENS = 256  # room for an answer that complies, so that the judge sees what it would say
JUDGED = ("rubric", "safety")
GRADERS = (*METRICS, "instructions", *JUDGED)
# the figure a summary table shows first for each grader
HEADLINE = {"instructions": "pass_rate", "safety": "violation_rate"}


@dataclass(frozen=True)
class Plan:
    """What to grade and how: the graders by name, rubric files, the judge, the side-by-side target."""

    graders: tuple[str, ...]
    rubrics: tuple[Path, ...] = ()
    judge: JudgeConfig | None = None
    compare: str | None = None  # the contestant label every other one is compared with
    safety_prompts: Path = PROMPTS
    max_new_tokens: int = 64
    limit: int = 0

    def __post_init__(self) -> None:
        unknown = [g for g in self.graders if g not in GRADERS]
        if unknown:
            raise ConfigError(f"unknown grader {unknown[0]!r}; choose from {', '.join(GRADERS)}")
        needs_judge = [g for g in self.graders if g in JUDGED] + [str(r) for r in self.rubrics]
        if self.compare is not None:
            needs_judge.append("--compare")
        if needs_judge and self.judge is None:
            raise ConfigError(f"{', '.join(needs_judge)} need(s) a judge: pass --judge-url and --judge-model")


def make_graders(plan: Plan, judge: Judge | None) -> list[tuple[str, Grader]]:
    """(the set it grades, grader) for every grader the plan names, rubric files last."""
    out: list[tuple[str, Grader]] = []
    for name in dict.fromkeys(plan.graders):
        if name in METRICS:
            out.append((TEST, MetricGrader(name)))
        elif name == "instructions":
            out.append((TEST, InstructionGrader()))
        elif name == "safety":
            assert judge is not None
            out.append((SAFETY, SafetyGrader(judge)))
        else:
            assert judge is not None
            out.append((TEST, RubricGrader(BUILT_IN[name], judge)))
    for path in plan.rubrics:
        assert judge is not None
        out.append((TEST, RubricGrader(load_rubric(path), judge)))
    return out


@dataclass
class Suite:
    """One evaluation's document, filled in as the run goes (and saved to `out` after each step)."""

    doc: dict[str, Any]
    out: Path | None = None
    started: float = field(default_factory=time.perf_counter)

    def save(self) -> None:
        self.doc["seconds"] = round(time.perf_counter() - self.started, 1)
        if self.out is not None:
            atomic_write(self.out, json.dumps(self.doc, indent=1, ensure_ascii=False) + "\n")

    def fail(self, error: Exception) -> None:
        self.doc["complete"] = False
        self.doc["error"] = str(error)
        self.save()


def case_record(c: Case) -> dict[str, Any]:
    rec: dict[str, Any] = {"prompt": c.prompt, "reference": c.reference}
    return rec | {k: v for k, v in c.fields.items() if k in ("category", "checks")}


def start(
    plan: Plan, sets: dict[str, Sequence[Case]], labels: Sequence[str], meta: dict[str, Any], out: Path | None
) -> Suite:
    judge = {"url": plan.judge.url, "model": plan.judge.model} if plan.judge else None
    doc = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **meta,
        "judge": judge,
        "complete": True,
        "error": "",
        "sets": {s: [case_record(c) for c in cases] for s, cases in sets.items()},
        "contestants": {label: {"answers": {}, "graders": {}} for label in labels},
        "comparisons": [],
    }
    return Suite(doc, out)


def grade_all(
    suite: Suite,
    plan: Plan,
    sets: dict[str, Sequence[Case]],
    answers: dict[str, dict[str, list[str]]],
    judge: Judge | None,
    announce: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Every grader over every contestant's answers, then the comparisons; the document, complete."""
    graders = make_graders(plan, judge)
    for label, by_set in answers.items():
        suite.doc["contestants"][label]["answers"] = by_set
    suite.save()
    try:
        for label, by_set in answers.items():
            for set_name, grader in graders:
                announce(f"grading {label} with {grader.name}")
                try:
                    grades = grader.grade(sets[set_name], by_set[set_name])
                except PartialResults as e:
                    suite.doc["contestants"][label]["graders"][grader.name] = {
                        "set": set_name,
                        "figures": {},
                        "grades": [g.as_dict() for g in e.results],
                    }
                    raise
                suite.doc["contestants"][label]["graders"][grader.name] = {
                    "set": set_name,
                    "figures": grader.figures(grades),
                    "grades": [g.as_dict() for g in grades],
                }
                suite.save()
        if plan.compare is not None:
            assert judge is not None
            sbs = SideBySide(judge)
            for label, by_set in answers.items():
                if label == plan.compare:
                    continue
                announce(f"side by side: {label} against {plan.compare}")
                entry: dict[str, Any] = {"model": label, "other": plan.compare, "figures": {}, "pairs": []}
                suite.doc["comparisons"].append(entry)
                try:
                    pairs = sbs.compare(sets[TEST], by_set[TEST], answers[plan.compare][TEST])
                except PartialResults as e:
                    entry["pairs"] = [p.as_dict() for p in e.results]
                    raise
                entry["figures"] = preference_figures(pairs) | _agreement(suite, label, plan.compare, pairs)
                entry["pairs"] = [p.as_dict() for p in pairs]
                suite.save()
    except JudgeUnavailableError as e:
        suite.fail(e)
        raise
    suite.save()
    return suite.doc


def _agreement(suite: Suite, model: str, other: str, pairs: list) -> dict[str, float]:
    """The judge's agreement with the first task metric graded, when one was (how far to trust it)."""
    graded = suite.doc["contestants"]
    metric = next((n for n in graded[model]["graders"] if n in METRICS and n in graded[other]["graders"]), None)
    if metric is None:
        return {}
    scores = [[g["score"] for g in graded[who]["graders"][metric]["grades"]] for who in (model, other)]
    agreement, asked = metric_agreement(pairs, *scores)
    return {"metric_agreement": agreement, "metric_agreement_n": float(asked)}


def load_sets(plan: Plan, data: Path | None) -> dict[str, list[Case]]:
    """The test set (when the plan grades it) and the safety prompts (when it has the safety grader)."""
    sets: dict[str, list[Case]] = {}
    test_graders = [g for g in plan.graders if g != "safety"] or list(plan.rubrics) or plan.compare
    if test_graders:
        if data is None:
            raise ConfigError("these graders grade a test file: pass --data")
        sets[TEST] = load_cases(data, plan.limit, any(g in METRICS for g in plan.graders))
    if "safety" in plan.graders:
        prompts = load_prompts(plan.safety_prompts)
        sets[SAFETY] = prompts[: plan.limit] if plan.limit else prompts
    return sets


def run_suite(
    model: Llama,
    tok: Tokenizer,
    contestants: Sequence[Contestant],
    plan: Plan,
    sets: dict[str, list[Case]],
    meta: dict[str, Any],
    out: Path | None = None,
    max_batch: int = 32,
    force: bool = False,
    more: Callable[[dict[str, list[Case]], dict[str, int]], dict[str, dict[str, list[str]]]] | None = None,
    announce: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Answer the sets (`load_sets`) with every contestant in one engine pass (and `more`, answers from
    elsewhere such as another base model), grade everything; the evaluation document."""
    max_new = {s: plan.max_new_tokens for s in sets} | ({SAFETY: SAFETY_TOKENS} if SAFETY in sets else {})
    answers = answer_all(model, tok, contestants, sets, max_new, max_batch, force)
    if more is not None:
        answers |= more(sets, max_new)
    meta = meta | {"adapters": {c.label: str(c.adapter) if c.adapter else None for c in contestants}}
    suite = start(plan, sets, list(answers), meta, out)
    judge = Judge(plan.judge) if plan.judge is not None else None
    return grade_all(suite, plan, sets, answers, judge, announce)


def flat_figures(doc: dict[str, Any], label: str) -> dict[str, float]:
    """One contestant's figures by name, for gates and registry metrics: `grader.figure` always, the bare
    `figure` where no other grader has one of that name, and `figure_vs_OTHER` for each side by side."""
    graders = doc["contestants"][label]["graders"]
    out: dict[str, float] = {}
    seen: dict[str, int] = {}
    for name, g in graders.items():
        for k, v in g["figures"].items():
            out[f"{name}.{k}"] = v
            seen[k] = seen.get(k, 0) + 1
    for g in graders.values():
        out |= {k: v for k, v in g["figures"].items() if seen[k] == 1}
    for cmp in doc["comparisons"]:
        if cmp["model"] == label:
            out |= {f"{k}_vs_{cmp['other']}": v for k, v in cmp["figures"].items()}
    return out
