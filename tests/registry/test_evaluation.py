"""A version published with its evaluation: the document is stored with it, its figures become metrics,
`registry show` prints them, and a document that does not grade the folder is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graftlm.cli.main import main
from graftlm.registry import Registry
from graftlm.registry.records import EVALUATION_FILE
from tests.eval.test_report import doc
from tests.registry.test_store import fake_adapter


def test_publish_with_an_evaluation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = fake_adapter(tmp_path / "summarize", 1)
    evaluation = doc(2, "2026-12-05T10:00:00+00:00") | {"adapters": {"base": None, "adapter": str(folder)}}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(evaluation))
    reg_dir = str(tmp_path / "reg")
    assert main(["registry", "publish", str(folder), "--eval", str(path), "--registry", reg_dir]) == 0
    v = Registry(tmp_path / "reg").resolve("summarize@1")
    assert EVALUATION_FILE in v.files
    assert v.metrics["good_rate"] == 0.5 and v.metrics["poor_rate"] == 0.25
    assert v.metrics["win_rate_vs_base"] == 0.5 and "rubric.good_rate" not in v.metrics
    assert Registry(tmp_path / "reg").evaluation(v) == evaluation
    capsys.readouterr()
    assert main(["registry", "show", "summarize@1", "--registry", reg_dir]) == 0
    assert "adapter rubric: good_rate=0.5" in capsys.readouterr().out


def test_an_evaluation_of_another_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = fake_adapter(tmp_path / "summarize", 1)
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(doc(2, "2026-12-05T10:00:00+00:00") | {"adapters": {"adapter": "/elsewhere"}}))
    argv = ["registry", "publish", str(folder), "--eval", str(path), "--registry", str(tmp_path / "reg")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not grade" in err and "--eval-model" in err
    assert main([*argv, "--eval-model", "adapter"]) == 0
