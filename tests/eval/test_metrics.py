"""Task metrics against reference implementations (rouge_score for ROUGE-L) and hand-checked cases."""

from __future__ import annotations

import json
import random

from rouge_score import rouge_scorer

from graftlm.eval.metrics import exact_match, first_json_object, json_field_f1, rouge_l


def test_rouge_l_equals_rouge_score() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(0)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "a",
        "cat",
        "sat",
        "on",
        "mat",
        "42",
        "x-ray",
    ]
    pairs = [
        ("Real-time strategy game of ancient warfare", "real time strategy game (ancient warfare)"),
        ("", "something"),
        ("same", "same"),
        ("KDE frontend to R!", "frontend, to R statistics"),
    ]
    pairs += [
        (" ".join(rng.choices(words, k=rng.randint(1, 12))), " ".join(rng.choices(words, k=rng.randint(1, 12))))
        for _ in range(200)
    ]
    for pred, ref in pairs:
        want = scorer.score(ref, pred)["rougeL"].fmeasure
        assert abs(rouge_l(pred, ref) - want) < 1e-9, (pred, ref)


def test_exact_match_ignores_only_whitespace() -> None:
    assert exact_match("  The cat  sat.\n", "The cat sat.") == 1.0
    assert exact_match("the cat sat.", "The cat sat.") == 0.0


def test_json_field_f1() -> None:
    ref = json.dumps({"package": "bash", "version": "5.2-1", "date": "2023-01-02", "author": "Matthias Klose"})
    assert json_field_f1(ref, ref) == 1.0
    half = 'Sure! {"package": "bash", "version": "5.2-1", "date": "2023-01-03", "author": "M. Klose"}'
    assert json_field_f1(half, ref) == 0.5
    extra = json.dumps({"package": "bash", "version": "5.2-1", "note": "x"})
    assert abs(json_field_f1(extra, ref) - 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)) < 1e-12
    assert json_field_f1("no json here {", ref) == 0.0
    assert first_json_object('```json\n{"a": {"b": 1}}\n```') == {"a": {"b": 1}}
