"""Verifiable-instruction checks: each passes and fails where it should, and bad settings are refused."""

from __future__ import annotations

import pytest

from graftlm.eval.checks import CheckError, InstructionGrader, count_sentences, count_words, run_checks, validate
from graftlm.eval.grade import Case


def one(output: str, **check: object) -> bool:
    return run_checks(output, [validate(check, "test")])[0][1]


def test_counts() -> None:
    assert count_words("It's a well-known fact, isn't it?") == 6
    assert count_sentences("One. Two! Three? And a tail") == 4
    assert count_sentences("Version 2.5 is out. Get it.") == 2
    assert count_sentences("   ") == 0


@pytest.mark.parametrize(
    ("output", "check", "ok"),
    [
        ("one two three", {"check": "words", "max": 3}, True),
        ("one two three four", {"check": "words", "max": 3}, False),
        ("one two", {"check": "words", "min": 3}, False),
        ("A. B. C.", {"check": "sentences", "min": 2, "max": 3}, True),
        ("A. B. C. D.", {"check": "sentences", "max": 3}, False),
        ("The Budget is due.", {"check": "keywords", "words": ["budget", "due"]}, True),
        ("The budgets are due.", {"check": "keywords", "words": ["budget"]}, False),  # whole words
        ("Please note the plan.", {"check": "forbidden", "words": ["please", "sorry"]}, False),
        ("Note the plan.", {"check": "forbidden", "words": ["please", "sorry"]}, True),
        ('{"name": "Ann"}', {"check": "json"}, True),
        ('```json\n{"name": "Ann"}\n```', {"check": "json"}, True),
        ('Sure! {"name": "Ann"}', {"check": "json"}, False),
        ('{"name": 3}', {"check": "json", "schema": {"properties": {"name": {"type": "string"}}}}, False),
        ('{"name": "Ann"}', {"check": "json", "schema": {"required": ["name", "age"]}}, False),
        ("all lower here", {"check": "case", "case": "lower"}, True),
        ("Not lower", {"check": "case", "case": "lower"}, False),
        ("LOUD 123", {"check": "case", "case": "upper"}, True),
        ("- a\n- b\n* c", {"check": "bullets", "min": 3, "max": 3}, True),
        ("- a\n- b", {"check": "bullets", "min": 3}, False),
        ("Dear team, hello", {"check": "starts_with", "text": "dear team"}, True),
        ("Hello", {"check": "starts_with", "text": "Dear"}, False),
        ("Thanks. Best regards", {"check": "ends_with", "text": "best regards"}, True),
        ("Le chat dort sur le canapé et la maison est calme ce soir.", {"check": "language", "language": "fr"}, True),
        ("The cat sleeps on the sofa and the house is quiet tonight.", {"check": "language", "language": "fr"}, False),
    ],
)
def test_check(output: str, check: dict[str, object], ok: bool) -> None:
    assert one(output, **check) is ok


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ({"check": "length"}, "unknown check 'length'"),
        ({"check": "keywords"}, "needs words"),
        ({"check": "words", "max": "ten"}, "max must be a whole number"),
        ({"check": "words", "most": 3}, "unknown settings ['most']"),
        ({"check": "case", "case": "title"}, "case is lower or upper"),
        ({"check": "json", "schema": {"type": "banana"}}, "not a valid JSON Schema"),
        ("words", "unknown check 'words'"),
    ],
)
def test_bad_checks_are_refused(check: object, message: str) -> None:
    with pytest.raises(CheckError, match="line 3") as e:
        validate(check, "line 3")
    assert message in str(e.value)


def test_instruction_grader_is_strict_per_prompt_and_counts_each_instruction() -> None:
    checks = [{"check": "words", "max": 5}, {"check": "keywords", "words": ["tea"]}]
    cases = [Case([{"role": "user", "content": "q"}], None, {"checks": checks})] * 3 + [
        Case([{"role": "user", "content": "q"}])
    ]
    grades = InstructionGrader().grade(cases, ["I like tea", "I like coffee a lot", "tea " * 10, "x"])
    assert [g.label for g in grades] == ["pass", "fail", "fail", "failed"]
    assert any("FAILED" in r and "keywords" in r for r in grades[1].reasons)
    f = InstructionGrader().figures(grades)
    assert f["pass_rate"] == 0.25
    assert f["instruction_rate"] == pytest.approx(4 / 6)  # 2 + 1 + 1 of the 6 checks on graded lines
