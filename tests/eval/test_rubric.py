"""User rubrics from files: a good one loads, a bad one is refused naming where."""

from __future__ import annotations

from pathlib import Path

import pytest

from graftlm.eval.rubric import RubricError, load_rubric

GOOD = """name = "support-reply"
task = "Reply to the customer's message."

[[dimension]]
name = "politeness"
good = "courteous"
neutral = "flat"
poor = "rude"

[[dimension]]
name = "accuracy"
good = "correct"
neutral = "vague"
poor = "wrong"
"""


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_rubric_file_loads(tmp_path: Path) -> None:
    r = load_rubric(write(tmp_path, GOOD))
    assert r.name == "support-reply" and [d.name for d in r.dimensions] == ["politeness", "accuracy"]
    assert r.reply().json_schema()["required"] == ["politeness", "accuracy", "reason"]


def test_a_rubric_that_does_not_parse_names_the_line(tmp_path: Path) -> None:
    broken = GOOD.replace('good = "correct"', 'good = "correct')
    with pytest.raises(RubricError, match=r"r\.toml: .*line 12, column 16"):
        load_rubric(write(tmp_path, broken))
    with pytest.raises(RubricError, match=r"r\.json: line 3, column"):
        load_rubric(write(tmp_path, '{"name": "x",\n "task": "t",\n "dimension": [}', "r.json"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('poor = "rude"\n', ""), "dimension 1 needs exactly name, good, neutral and poor"),
        (lambda t: t.replace('task = "Reply to the customer\'s message."', ""), "`task` must say"),
        (lambda t: t.replace('"accuracy"', '"politeness"'), "two dimensions share a name"),
        (lambda t: t.replace('"accuracy"', '"reason"'), "'reason' is not a usable name"),
        (lambda t: "colour = 1\n" + t, "unknown keys colour"),
        (lambda t: t.split("[[dimension]]")[0], "at least one [[dimension]]"),
    ],
)
def test_a_rubric_that_is_not_one_is_refused(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(RubricError, match=r"r\.toml") as e:
        load_rubric(write(tmp_path, edit(GOOD)))
    assert message in str(e.value)


def test_a_missing_rubric_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RubricError, match=r"cannot read rubric .*nope\.toml"):
        load_rubric(tmp_path / "nope.toml")
