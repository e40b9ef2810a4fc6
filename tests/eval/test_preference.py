"""Side-by-side preference: both orders asked, the swap undone, outcomes and intervals as defined."""

from __future__ import annotations

import json

import pytest

from graftlm.eval.grade import Case, wilson
from graftlm.eval.judge import Judge, JudgeConfig
from graftlm.eval.preference import Pair, SideBySide, combine, metric_agreement, preference_figures, seen_from_model
from tests.eval.judge_stub import StubJudge, user_text


def test_the_swap_is_undone() -> None:
    assert seen_from_model("a", model_is_a=True) == "model"
    assert seen_from_model("b", model_is_a=True) == "other"
    assert seen_from_model("a", model_is_a=False) == "other"
    assert seen_from_model("b", model_is_a=False) == "model"
    assert seen_from_model("tie", model_is_a=False) == "tie"


@pytest.mark.parametrize(
    ("first", "second", "outcome"),
    [
        ("model", "model", "win"),
        ("model", "tie", "win"),
        ("model", "other", "tie"),  # the judge followed the position, not the answer
        ("tie", "tie", "tie"),
        ("other", "tie", "loss"),
        ("other", "other", "loss"),
        ("failed", "model", "failed"),
    ],
)
def test_combine(first: str, second: str, outcome: str) -> None:
    assert combine(first, second) == outcome


def _answers(body: dict, pick) -> str:
    q = user_text(body)
    a = q.split("[Answer A]\n")[1].split("\n[End of answer A]")[0]
    b = q.split("[Answer B]\n")[1].split("\n[End of answer B]")[0]
    return json.dumps({"winner": pick(a, b).upper() if pick(a, b) != "tie" else "tie", "reason": f"{a} vs {b}"})


def _run(pick, model: list[str], other: list[str]) -> tuple[list[Pair], list[dict]]:
    with StubJudge(lambda body: _answers(body, pick)) as stub:
        cases = [Case([{"role": "user", "content": f"q{i}"}], f"ref{i}") for i in range(len(model))]
        pairs = SideBySide(Judge(JudgeConfig(url=stub.url, model="m"))).compare(cases, model, other)
    return pairs, stub.requests


def test_every_pair_is_asked_twice_with_positions_swapped() -> None:
    pairs, requests = _run(lambda a, b: "a" if len(a) >= len(b) else "b", ["long answer", "x"], ["short", "longer"])
    assert len(requests) == 4
    shown = sorted((user_text(r).split("[Answer A]\n")[1].split("\n")[0]) for r in requests)
    assert shown == sorted(["long answer", "short", "x", "longer"])
    assert sum("[A reference answer, for your information]\nref0" in user_text(r) for r in requests) == 2
    assert [p.outcome for p in pairs] == ["win", "loss"]
    assert all(p.consistent for p in pairs)


def test_a_judge_that_always_picks_the_first_position_gives_ties() -> None:
    pairs, _ = _run(lambda a, b: "a", ["m1", "m2", "m3"], ["o1", "o2", "o3"])
    assert [p.outcome for p in pairs] == ["tie"] * 3
    assert preference_figures(pairs)["consistency"] == 0.0


def test_preference_figures_against_a_direct_count() -> None:
    outcomes = ["win"] * 7 + ["tie"] * 2 + ["loss"] * 3 + ["failed"]
    pairs = [Pair("model", "model", o) if o != "tie" else Pair("model", "other", o) for o in outcomes]
    pairs[-1] = Pair("failed", "model", "failed")
    f = preference_figures(pairs)
    assert (f["win_rate"], f["tie_rate"], f["loss_rate"], f["failed_rate"]) == (7 / 13, 2 / 13, 3 / 13, 1 / 13)
    assert (f["win_rate_low"], f["win_rate_high"]) == pytest.approx(wilson(7, 13))
    assert f["preference"] == pytest.approx(8 / 13)
    assert f["consistency"] == pytest.approx(10 / 12)  # the two position-following ties are inconsistent


def test_agreement_with_a_metric_counts_each_asking_with_a_winner() -> None:
    pairs = [
        Pair("model", "model", "win"),  # metric prefers the model: 2 agreeing askings
        Pair("model", "other", "tie"),  # metric prefers the other: 1 agrees, 1 does not
        Pair("tie", "other", "loss"),  # equal metric scores: not counted
        Pair("tie", "tie", "tie"),  # no winner: not counted
    ]
    agreement, asked = metric_agreement(pairs, [0.9, 0.1, 0.5, 0.2], [0.1, 0.8, 0.5, 0.3])
    assert (agreement, asked) == (3 / 4, 4)
