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
