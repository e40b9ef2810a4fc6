"""What every grader shares: a case to grade, the grade it gets, and the interval around a rate.

A grader takes the cases (prompt, reference or none, the test line's other fields) and the outputs a
model gave for them, and returns one `Grade` per output: a score in [0, 1] with its reasons, a label
where the grader has labels (good / neutral / poor, pass / fail, safe / violation), and `failed` set when
it could not grade at all (a judge that answered with something unreadable). `figures` turns a list of
grades into the numbers a table, a report or a pipeline gate reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals


@dataclass(frozen=True)
class Case:
    """One test example: the chat before the answer, the reference answer if any, the line's other fields."""

    messages: list[dict[str, str]]
    reference: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The last user turn: what the answer is an answer to."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


@dataclass
class Grade:
    score: float  # in [0, 1]; 0 when failed
    label: str = ""  # the grader's verdict word, e.g. good | neutral | poor
    reasons: list[str] = field(default_factory=list)
    dimensions: dict[str, str] = field(default_factory=dict)  # per-dimension labels (rubric graders)
    failed: bool = False  # the grader could not grade this output; never counted as a pass

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v or k == "score"}

    @classmethod
    def failure(cls, why: str) -> Grade:
        return cls(0.0, "failed", [why], failed=True)


class Grader(Protocol):
    name: str

    def grade(self, cases: Sequence[Case], outputs: Sequence[str]) -> list[Grade]:
        """One grade per (case, output) pair, in order."""
        ...

    def figures(self, grades: Sequence[Grade]) -> dict[str, float]:
        """The grader's summary numbers (each a name a gate can use, e.g. `poor_rate`)."""
        ...


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion (Wilson, 1927); (0, 1) when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and is sound at the rates near 0 or 1 that
    gates care about (a violation rate of 0 out of 40 is not a certain 0).
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(count: float, n: int, name: str) -> dict[str, float]:
    """`name` as count / n with its 95% interval as `name_low` and `name_high`."""
    low, high = wilson(count, n)
    return {name: count / n if n else 0.0, f"{name}_low": low, f"{name}_high": high}


def mean_score(grades: Sequence[Grade]) -> float:
    return sum(g.score for g in grades) / len(grades) if grades else 0.0
