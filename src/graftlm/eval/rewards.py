"""Rewards for `graftlm rl` and pass rules for `graftlm synth`: graders, or a weighted sum of them.

A reward spec is one term or several joined by `+`, each an optional weight and a grader:

    instructions                      the test line's verifiable checks: 1 when every check passes
    rouge_l | exact_match | ...        a task metric against the line's reference answer
    rubric                             the judge's five-dimension rubric (needs --judge-url)
    mymodule:score                     a Python function fn(prompt, output, **fields) -> float
    0.8*instructions+0.2*mymodule:fn   a weighted sum

A Python function is imported from the working directory or `PYTHONPATH`; `fields` are the data line's
other keys (`checks`, `completion`, anything the file carries). One that raises, or returns something
that is not a finite number, stops the run with a `RewardError` naming the prompt.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graftlm.errors import ConfigError, GraftlmError
from graftlm.eval.checks import InstructionGrader
from graftlm.eval.grade import Case, Grade, Grader, mean_score
from graftlm.eval.judge import Judge, JudgeConfig
from graftlm.eval.metrics import METRICS, MetricGrader
from graftlm.eval.rubric import BUILT_IN, RubricGrader

TERM = re.compile(r"^(?:(?P<w>[-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?)\s*\*\s*)?(?P<name>[A-Za-z0-9_.:]+)$")
PASSING = ("pass", "good", "safe")  # grade labels that mean the output passed


class RewardError(GraftlmError):
    """A reward function that raised or returned something that is not a finite number."""


@dataclass(frozen=True)
class PythonGrader:
    """`module:function` called as fn(prompt, output, **fields) for each output; its float is the score."""

    name: str
    fn: Callable[..., Any]

    @classmethod
    def load(cls, spec: str) -> PythonGrader:
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise ConfigError(f"reward {spec!r}: a Python reward is module:function")
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, "")  # the working directory, as `python -m` would have it
        try:
            importlib.invalidate_caches()  # a module written since the interpreter started
            fn = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise ConfigError(f"reward {spec!r}: cannot import {module!r}: {e}") from None
        except AttributeError:
            raise ConfigError(f"reward {spec!r}: module {module!r} has no {attr!r}") from None
        if not callable(fn):
            raise ConfigError(f"reward {spec!r}: {attr!r} is not a function")
        return cls(spec, fn)

    def grade(self, cases: Sequence[Case], outputs: Sequence[str]) -> list[Grade]:
        grades = []
        for case, out in zip(cases, outputs, strict=True):
            try:
                value = self.fn(case.prompt, out, **case.fields)
                score = float(value)
            except Exception as e:
                raise RewardError(
                    f"reward {self.name} raised {type(e).__name__}: {e} (prompt: {case.prompt[:200]!r})"
                ) from e
            if not math.isfinite(score):
                raise RewardError(f"reward {self.name} returned {value!r} (prompt: {case.prompt[:200]!r})")
            grades.append(Grade(score, reasons=[f"{self.name} {score:.3f}"]))
        return grades

    def figures(self, grades: Sequence[Grade]) -> dict[str, float]:
        return {"score": mean_score(grades)}


def _grader(name: str, judge: Judge | None) -> Grader:
    if name == "instructions":
        return InstructionGrader()
    if name in METRICS:
        return MetricGrader(name)
    if name in BUILT_IN:
        if judge is None:
            raise ConfigError(f"reward {name!r} needs a judge: pass --judge-url and --judge-model")
        return RubricGrader(BUILT_IN[name], judge)
    if ":" in name:
        return PythonGrader.load(name)
    known = ", ".join(["instructions", *METRICS, *BUILT_IN])
    raise ConfigError(f"unknown reward {name!r}: use {known}, or module:function for a Python function")


@dataclass(frozen=True)
class Scored:
    """One output's reward, whether every term passed, and each term's grade."""

    reward: float
    passed: bool
    grades: tuple[Grade, ...]


@dataclass(frozen=True)
class Reward:
    """A weighted sum of graders. An output passes when every term's grade does: a passing label (pass,
    good, safe) where the grader gives labels, otherwise a score of at least `min_score`."""

    spec: str
    terms: tuple[tuple[float, Grader], ...]
    min_score: float = 0.5

    @classmethod
    def parse(cls, spec: str, judge: JudgeConfig | None = None, min_score: float = 0.5) -> Reward:
        judge_ = Judge(judge) if judge is not None and judge.url else None
        terms = []
        for part in spec.replace(" ", "").split("+"):
            m = TERM.match(part)
            if not m:
                raise ConfigError(f"reward {spec!r}: cannot read {part!r} (write e.g. 0.5*instructions+0.5*mod:fn)")
            weight = float(m["w"]) if m["w"] else 1.0
            if not math.isfinite(weight):
                raise ConfigError(f"reward {spec!r}: weight {m['w']} is not a finite number")
            terms.append((weight, _grader(m["name"], judge_)))
        return cls(spec, tuple(terms), min_score)

    @property
    def names(self) -> list[str]:
        return [g.name for _, g in self.terms]

    def score(self, cases: Sequence[Case], outputs: Sequence[str]) -> list[Scored]:
        by_term = [g.grade(cases, outputs) for _, g in self.terms]
        out = []
        for i in range(len(outputs)):
            grades = tuple(t[i] for t in by_term)
            reward = sum(w * g.score for (w, _), g in zip(self.terms, grades, strict=True))
            out.append(Scored(reward, all(self._passes(g) for g in grades), grades))
        return out

    def _passes(self, g: Grade) -> bool:
        if g.failed:
            return False
        return g.label in PASSING if g.label else g.score >= self.min_score
