"""The demo's serving part on the tiny model: the server starts, concurrent requests naming different
adapters (and the base model) all come back, and the throughput line is printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graftlm.cli.demo_server import serve_part
from graftlm.cli.main import main
from graftlm.lora.peft_io import save_adapter
from tests.lora.helpers import EIGHT, random_adapter


def test_serve_part_answers_concurrent_requests(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    examples, adapters = tmp_path / "examples", tmp_path / "adapters"
    for i, task in enumerate(("alpha", "extract")):
        (examples / task).mkdir(parents=True)
        lines = [
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"{task} question {k}"},
                        {"role": "assistant", "content": "x"},
                    ]
                }
            )
            for k in range(3)
        ]
        (examples / task / "test.jsonl").write_text("\n".join(lines) + "\n")
        (examples / task / "task.json").write_text(
            json.dumps({"name": task, "metric": "exact_match", "max_new_tokens": 6})
        )
        a = random_adapter(tiny_dir, EIGHT[i], seed=i)
        save_adapter(adapters / task, EIGHT[i], a.tensors, a.base_fingerprint)
    serve_part(str(tiny_dir), examples, adapters, ["alpha", "extract"], per_task=2)
    out = capsys.readouterr().out
    assert "6 concurrent requests" in out and "tokens/s" in out
    assert "alpha" in out and "extract" in out


def test_serve_refuses_a_missing_adapters_folder(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "-m", str(tiny_dir), "--adapters", "/nonexistent/adapters"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_the_quick_demo_trains_briefly_and_the_full_one_retrains_whole(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make demo` trains each adapter for its first QUICK_STEPS steps and reuses it next time;
    `make demo-full` does not take a quick adapter for a whole one, and a quick run reuses the whole one."""
    from graftlm.cli.demo import QUICK_STEPS, ensure_adapter
    from graftlm.eval.runner import Task

    task_dir, out = tmp_path / "task", tmp_path / "adapters" / "task"
    task_dir.mkdir()
    rows = [{"prompt": f"Say {k}:", "completion": f" {k}"} for k in range(2 * QUICK_STEPS + 8)]
    (task_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    train = {"lr": 1e-3, "epochs": 1, "batch_size": 1}
    (task_dir / "task.json").write_text(json.dumps({"name": "task", "metric": "exact_match", "train": train}))
    task = Task.beside(task_dir / "train.jsonl")
    assert task is not None

    def steps() -> int:
        return json.loads((out / "training.json").read_text())["metrics"]["steps"]

    ensure_adapter(str(tiny_dir), task_dir, task, out, full=False)
    assert steps() == QUICK_STEPS
    ensure_adapter(str(tiny_dir), task_dir, task, out, full=False)
    assert "reusing" in capsys.readouterr().out
    ensure_adapter(str(tiny_dir), task_dir, task, out, full=True)
    assert steps() == len(rows)
    ensure_adapter(str(tiny_dir), task_dir, task, out, full=False)
    assert "reusing" in capsys.readouterr().out
