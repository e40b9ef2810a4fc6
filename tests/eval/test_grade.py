"""Rates, intervals and the rubric's aggregation rule, against direct computations."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from graftlm.eval.grade import Grade, wilson
from graftlm.eval.rubric import overall, rubric_figures


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (17, 40), (1, 200), (55, 60)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson(k, n)
    assert low == pytest.approx(ref.low, abs=1e-9) and high == pytest.approx(ref.high, abs=1e-9)


def test_wilson_without_data_is_the_whole_range() -> None:
    assert wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("labels", "want"),
    [
        ({"a": "good", "b": "good", "c": "good"}, "good"),
        ({"a": "good", "b": "neutral", "c": "good"}, "neutral"),
        ({"a": "good", "b": "neutral", "c": "poor"}, "poor"),
        ({"a": "poor", "b": "poor"}, "poor"),
        ({"a": "neutral"}, "neutral"),
        ({}, "neutral"),
    ],
)
def test_good_only_if_all_good_poor_if_any_poor(labels: dict[str, str], want: str) -> None:
    assert overall(labels) == want


def test_rubric_figures_count_an_ungraded_output_as_poor() -> None:
    grades = [
        Grade(1.0, "good", dimensions={"x": "good", "y": "good"}),
        Grade(0.5, "neutral", dimensions={"x": "good", "y": "neutral"}),
        Grade(0.0, "poor", dimensions={"x": "poor", "y": "good"}),
        Grade.failure("judge reply: missing x"),
    ]
    f = rubric_figures(grades, ["x", "y"])
    assert (f["good_rate"], f["neutral_rate"], f["poor_rate"], f["failed_rate"]) == (0.25, 0.25, 0.5, 0.25)
    assert f["x_good_rate"] == 0.5 and f["y_good_rate"] == 0.5
    assert (f["poor_rate_low"], f["poor_rate_high"]) == pytest.approx(wilson(2, 4))
    assert f["score"] == pytest.approx(1.5 / 4)
