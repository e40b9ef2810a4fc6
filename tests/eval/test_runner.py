"""`graftlm eval` end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graftlm.cli.main import main
from graftlm.engine.generate import Generator
from graftlm.eval.runner import Task, evaluate
from graftlm.loading.checkpoint import load_checkpoint


def _task_dir(tmp_path: Path, metric: str) -> Path:
    d = tmp_path / "task"
    d.mkdir()
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
        for w in ("apple", "sky", "grass")
    ]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "task.json").write_text(json.dumps({"name": "say", "metric": metric, "max_new_tokens": 4}))
    return d / "test.jsonl"


def test_scores_are_the_metric_of_the_generated_answers(tiny_dir: Path, tmp_path: Path) -> None:
    data = _task_dir(tmp_path, "rouge_l")
    gen = Generator(*load_checkpoint(tiny_dir))
    result = evaluate(gen, data, Task("say", "exact_match", 4), batch_size=2)
    assert result.n == 3 and len(result.predictions) == 3
    for pred, ref, score in result.predictions:
        assert score == float(pred == ref)
    # batching does not change the answers
    one = evaluate(gen, data, Task("say", "exact_match", 4), batch_size=1)
    assert [p for p, _, _ in one.predictions] == [p for p, _, _ in result.predictions]


def test_eval_cli_reads_task_json(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _task_dir(tmp_path, "rouge_l")
    assert main(["eval", "-m", str(tiny_dir), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "rouge_l" in out and "base" in out


def test_eval_line_without_reference_is_reported(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["eval", "-m", str(tiny_dir), "--data", str(data), "--metric", "exact_match"]) == 2
    assert "t.jsonl:1: an evaluation line must end with the assistant" in capsys.readouterr().err
