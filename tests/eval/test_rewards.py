"""Reward specs: graders and Python functions, weighted sums, what passes, and errors that name the prompt."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from graftlm.errors import ConfigError
from graftlm.eval.grade import Case
from graftlm.eval.rewards import Reward, RewardError

MODULE = """
def brevity(prompt, output, **fields):
    return 1.0 / (1 + len(output.split()))

def broken(prompt, output, **fields):
    raise KeyError("no such field")

def nan(prompt, output, **fields):
    return float("nan")

def fields_seen(prompt, output, **fields):
    return float(fields["bonus"])

not_a_function = 3
"""


@pytest.fixture(autouse=True)
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rewardfns.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("rewardfns", None)


CASE = Case(
    [{"role": "user", "content": "Answer in lowercase."}],
    "the reference",
    {"checks": [{"check": "case", "case": "lower"}], "bonus": 2},
)


def test_a_weighted_sum_adds_each_term_times_its_weight() -> None:
    reward = Reward.parse("0.5*instructions + 2*rewardfns:brevity+rouge_l")
    assert reward.names == ["instructions", "rewardfns:brevity", "rouge_l"]
    (good, bad) = reward.score([CASE, CASE], ["the reference", "The Reference Text"])
    assert good.reward == pytest.approx(0.5 * 1 + 2 * (1 / 3) + 1.0)
    assert not good.passed  # every term must pass: brevity's 1/3 is under min_score
    assert Reward.parse("instructions+rouge_l").score([CASE], ["the reference"])[0].passed
    assert not bad.passed and bad.grades[0].label == "fail"


def test_fields_reach_the_function_and_unlabelled_scores_pass_from_min_score() -> None:
    assert Reward.parse("rewardfns:fields_seen").score([CASE], ["x"])[0].reward == 2.0
    low = Reward.parse("rewardfns:brevity", min_score=0.6).score([CASE], ["one two"])[0]
    assert not low.passed and low.reward == pytest.approx(1 / 3)


def test_a_function_that_raises_or_returns_nan_names_the_prompt() -> None:
    with pytest.raises(RewardError, match=r"rewardfns:broken raised KeyError.*Answer in lowercase"):
        Reward.parse("rewardfns:broken").score([CASE], ["x"])
    with pytest.raises(RewardError, match="returned nan"):
        Reward.parse("rewardfns:nan").score([CASE], ["x"])


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("nonsense", "unknown reward"),
        ("rewardfns:missing", "has no 'missing'"),
        ("rewardfns:not_a_function", "not a function"),
        ("no_module_xyz:f", "cannot import"),
        ("2*", "cannot read"),
        ("rubric", "needs a judge"),
    ],
)
def test_bad_specs_are_refused_before_anything_runs(spec: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        Reward.parse(spec)
