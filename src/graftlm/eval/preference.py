"""Side-by-side preference: a judge picks the better of two answers to the same prompt.

Judges favour one position (often the first) whatever it holds, so every pair is asked twice, with the
answers swapped. Each asking gives the model under test +1 (its answer preferred), 0 (tie) or -1; the
pair is a win when the two add up to more than 0, a loss below 0, a tie at 0. A judge that prefers
"whatever comes first" thus yields ties, not wins. `consistency` is the share of pairs whose two
verdicts agree once the swap is undone: how far the judge can be trusted with these answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from graftlm.eval.grade import Case, rate
from graftlm.eval.judge import Judge, MalformedReplyError, Reply

REPLY = Reply("preference", {"winner": ("A", "B", "tie")})
SYSTEM = (
    "You are an impartial judge. You compare two answers to the same request and say which one is better: "
    "more helpful, correct, faithful to the request and well written. Length alone is no merit. The order of "
    "the answers means nothing. You reply with one JSON object and nothing else."
)
# an asking's verdict, seen from the model under test: its answer preferred, a tie, the other's preferred
POINTS = {"model": 1, "tie": 0, "other": -1}


@dataclass
class Pair:
    first: str  # the verdict with the model's answer shown as A: model | tie | other | failed
    second: str  # with the answers swapped (the model's answer shown as B), seen from the model
    outcome: str  # win | tie | loss | failed
    reasons: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return self.outcome != "failed" and self.first == self.second

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"consistent": self.consistent}


def seen_from_model(winner: str, model_is_a: bool) -> str:
    """The judge's winner ("a", "b", "tie") as model | tie | other."""
    if winner == "tie":
        return "tie"
    return "model" if (winner == "a") == model_is_a else "other"


def combine(first: str, second: str) -> str:
    """win | tie | loss for the model from its two verdicts (either failed: failed)."""
    if "failed" in (first, second):
        return "failed"
    total = POINTS[first] + POINTS[second]
    return "win" if total > 0 else "loss" if total < 0 else "tie"


def prompt(case: Case, a: str, b: str) -> str:
    ref = (
        f"[A reference answer, for your information]\n{case.reference}\n[End of reference]\n\n"
        if case.reference
        else ""
    )
    return (
        f"[User's request]\n{case.prompt}\n[End of request]\n\n{ref}"
        f"[Answer A]\n{a}\n[End of answer A]\n\n[Answer B]\n{b}\n[End of answer B]\n\n"
        f'Which answer is better? "tie" if neither is. Reply with only this JSON object: {REPLY.example()}'
    )


@dataclass
class SideBySide:
    judge: Judge

    def ask(self, case: Case, model: str, other: str) -> Pair:
        verdicts, reasons = [], []
        for model_is_a in (True, False):
            a, b = (model, other) if model_is_a else (other, model)
            try:
                got = self.judge.ask(SYSTEM, prompt(case, a, b), REPLY)
            except MalformedReplyError as e:
                verdicts.append("failed")
                reasons.append(f"judge reply: {e}")
                continue
            verdicts.append(seen_from_model(got["winner"], model_is_a))
            reasons.append(got["reason"])
        return Pair(verdicts[0], verdicts[1], combine(*verdicts), reasons)

    def compare(self, cases: Sequence[Case], model: Sequence[str], other: Sequence[str]) -> list[Pair]:
        items = list(zip(cases, model, other, strict=True))
        return self.judge.map(lambda x: self.ask(*x), items, f"side by side ({self.judge.config.model})")


def preference_figures(pairs: Sequence[Pair]) -> dict[str, float]:
    """Win, tie and loss rates with 95% (Wilson) intervals, the preference (wins + ties / 2), the judge's
    consistency under the swap, and the share of pairs it could not judge. Unjudged pairs stay in the
    denominator, so they lower the win rate rather than vanish."""
    n = len(pairs)
    count = {k: sum(p.outcome == k for p in pairs) for k in ("win", "tie", "loss", "failed")}
    judged = n - count["failed"]
    return {
        **rate(count["win"], n, "win_rate"),
        **rate(count["tie"], n, "tie_rate"),
        **rate(count["loss"], n, "loss_rate"),
        **rate(count["win"] + count["tie"] / 2, n, "preference"),
        "consistency": sum(p.consistent for p in pairs) / judged if judged else 0.0,
        "failed_rate": count["failed"] / n if n else 0.0,
        "pairs": float(n),
    }


def metric_agreement(pairs: Sequence[Pair], model: Sequence[float], other: Sequence[float]) -> tuple[float, int]:
    """How often a verdict picks the answer a task metric scores higher: the share of askings, among
    those with a winner and unequal metric scores, that agree; and how many such askings there were."""
    agree = asked = 0
    for p, m, o in zip(pairs, model, other, strict=True):
        if m == o:
            continue
        for verdict in (p.first, p.second):
            if verdict in ("model", "other"):
                asked += 1
                agree += (verdict == "model") == (m > o)
    return (agree / asked if asked else 0.0), asked
