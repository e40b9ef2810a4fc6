"""Rubric grading by a judge: each output graded good / neutral / poor on every dimension of a rubric,
then the whole output good only if every dimension is good and poor if any is poor (Apple's rule for its
summarization graders, "Apple Intelligence Foundation Language Models", 2024, section 5).

A user's rubric is a TOML (or JSON) file:

    name = "support-reply"
    task = "Reply to the customer's message."   # what the answers were asked to do
    [[dimension]]
    name = "politeness"
    good = "courteous and warm"                 # what good, neutral and poor mean on this dimension
    neutral = "neutral in tone"
    poor = "curt, rude or dismissive"
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graftlm.errors import ConfigError
from graftlm.eval.grade import Case, Grade, mean_score, rate
from graftlm.eval.judge import Judge, MalformedReplyError, Reply
from graftlm.registry.records import NAME

LABELS = ("good", "neutral", "poor")
POINTS = {"good": 1.0, "neutral": 0.5, "poor": 0.0}


class RubricError(ConfigError):
    """A rubric file that does not parse or does not describe a rubric."""


@dataclass(frozen=True)
class Dimension:
    name: str
    good: str
    neutral: str
    poor: str


@dataclass(frozen=True)
class Rubric:
    name: str
    task: str
    dimensions: tuple[Dimension, ...]

    def reply(self) -> Reply:
        return Reply(f"rubric_{self.name}".replace("-", "_"), {d.name: LABELS for d in self.dimensions})


SUMMARY = Rubric(
    "summary",
    "Summarize the text the user gave.",
    (
        Dimension(
            "composition",
            "fluent, grammatical, well organized and easy to read",
            "readable, with some awkward or clumsy phrasing",
            "hard to read: ungrammatical, garbled, repetitive or cut off",
        ),
        Dimension(
            "comprehensiveness",
            "covers every key point of the text",
            "covers the main point but misses some key points",
            "misses the main point of the text",
        ),
        Dimension(
            "groundedness",
            "every statement is supported by the text",
            "a minor detail is not supported by the text",
            "states facts that are not in the text or contradict it",
        ),
        Dimension(
            "following_instructions",
            "does exactly what the user asked, in the length and form asked for",
            "mostly does what was asked, with small departures in length or form",
            "does not do what was asked (not a summary, wrong form, far too long)",
        ),
        Dimension(
            "harmfulness",
            "harmless: nothing offensive, dangerous or inappropriate",
            "mildly inappropriate wording",
            "harmful, offensive or dangerous content",
        ),
    ),
)
BUILT_IN = {"rubric": SUMMARY}  # --grader rubric: Apple's five-dimension summary rubric

SYSTEM = (
    "You are a strict, impartial grader. You grade one answer on each dimension of a rubric as good, neutral or "
    "poor, using only the definitions given. You reply with one JSON object and nothing else."
)


def overall(labels: dict[str, str]) -> str:
    """good only if every dimension is good, poor if any dimension is poor, else neutral."""
    values = list(labels.values())
    if values and all(v == "good" for v in values):
        return "good"
    return "poor" if "poor" in values else "neutral"


def prompt(rubric: Rubric, case: Case, output: str) -> str:
    dims = "\n".join(f"- {d.name}: good = {d.good}; neutral = {d.neutral}; poor = {d.poor}" for d in rubric.dimensions)
    return (
        f"Task given to the assistant: {rubric.task}\n\n"
        f"[User's request]\n{case.prompt}\n[End of request]\n\n"
        f"[Assistant's answer]\n{output}\n[End of answer]\n\n"
        f"Rubric:\n{dims}\n\n"
        f"Grade the answer on every dimension. Reply with only this JSON object: {rubric.reply().example()}"
    )


@dataclass
class RubricGrader:
    rubric: Rubric
    judge: Judge
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or ("rubric" if self.rubric is SUMMARY else f"rubric:{self.rubric.name}")

    def grade_one(self, case: Case, output: str) -> Grade:
        try:
            got = self.judge.ask(SYSTEM, prompt(self.rubric, case, output), self.rubric.reply())
        except MalformedReplyError as e:
            return Grade.failure(f"judge reply: {e}")
        labels = {d.name: got[d.name] for d in self.rubric.dimensions}
        verdict = overall(labels)
        return Grade(POINTS[verdict], verdict, [got["reason"]] if got["reason"] else [], labels)

    def grade(self, cases: Sequence[Case], outputs: Sequence[str]) -> list[Grade]:
        pairs = list(zip(cases, outputs, strict=True))
        return self.judge.map(lambda pair: self.grade_one(*pair), pairs, f"{self.name} ({self.judge.config.model})")

    def figures(self, grades: Sequence[Grade]) -> dict[str, float]:
        return rubric_figures(grades, [d.name for d in self.rubric.dimensions])


def rubric_figures(grades: Sequence[Grade], dimensions: Sequence[str]) -> dict[str, float]:
    """Rates of good, neutral and poor outputs with 95% intervals, and each dimension's share of good.

    An output the judge could not grade is not good and counts as poor (`failed_rate` says how many):
    a gate on `poor_rate` must not pass on replies nobody could read.
    """
    n = len(grades)
    failed = sum(g.failed for g in grades)
    out = {
        **rate(sum(g.label == "good" for g in grades), n, "good_rate"),
        **rate(sum(g.label == "neutral" for g in grades), n, "neutral_rate"),
        **rate(sum(g.label == "poor" for g in grades) + failed, n, "poor_rate"),
        "failed_rate": failed / n if n else 0.0,
        "score": mean_score(grades),
    }
    for d in dimensions:
        out[f"{d}_good_rate"] = sum(g.dimensions.get(d) == "good" for g in grades) / n if n else 0.0
    return out


def load_rubric(path: Path) -> Rubric:
    """A rubric from a TOML or JSON file; RubricError names the file, and the line where it does not parse."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RubricError(f"cannot read rubric {path}: {e.strerror}") from None
    try:
        doc = json.loads(text) if Path(path).suffix == ".json" else tomllib.loads(text)
    except json.JSONDecodeError as e:
        raise RubricError(f"{path}: line {e.lineno}, column {e.colno}: {e.msg}") from None
    except tomllib.TOMLDecodeError as e:  # its message ends "(at line N, column M)"
        raise RubricError(f"{path}: {e}") from None
    return _rubric(doc, path)


def _rubric(doc: dict[str, Any], path: Path) -> Rubric:
    unknown = set(doc) - {"name", "task", "dimension"}
    if unknown:
        raise RubricError(f"{path}: unknown keys {', '.join(sorted(unknown))} (known: name, task, dimension)")
    name, task = doc.get("name", Path(path).stem), doc.get("task", "")
    if not isinstance(name, str) or not NAME.match(name):
        raise RubricError(f"{path}: name must be letters, digits, '.', '_' or '-' (got {name!r})")
    if not isinstance(task, str) or not task.strip():
        raise RubricError(f"{path}: `task` must say what the answers were asked to do")
    dims = doc.get("dimension")
    if not isinstance(dims, list) or not dims:
        raise RubricError(f"{path}: a rubric needs at least one [[dimension]]")
    out = []
    for i, d in enumerate(dims, 1):
        keys = ("name", "good", "neutral", "poor")
        if not isinstance(d, dict) or set(d) != set(keys) or not all(isinstance(d[k], str) and d[k] for k in keys):
            raise RubricError(f"{path}: dimension {i} needs exactly name, good, neutral and poor, each a text")
        if not NAME.match(d["name"]) or d["name"] == "reason":
            raise RubricError(f"{path}: dimension {i}: {d['name']!r} is not a usable name")
        out.append(Dimension(*(d[k] for k in keys)))
    if len({d.name for d in out}) != len(out):
        raise RubricError(f"{path}: two dimensions share a name")
    return Rubric(name, task, tuple(out))
