"""The shipped example tasks are what the demo and the docs say they are: every task the demo trains has
supervised data in train.jsonl (the demo once stopped on a prompts-only file there), and every test file
loads as an evaluation set for its task."""

from __future__ import annotations

from pathlib import Path

from graftlm.cli.demo import example_tasks
from graftlm.eval.runner import Task, load_cases
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.train.data import encode_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_every_demo_task_has_supervised_training_data(tiny_dir: Path) -> None:
    tasks = example_tasks(EXAMPLES)
    assert {"summarize", "proofread", "extract"} <= set(tasks)
    tok = load_checkpoint(tiny_dir)[1]
    for name in tasks:
        encoded = encode_file(EXAMPLES / name / "train.jsonl", tok, use_chat=True)
        assert all(any(e.targets) for e in encoded), name


def test_every_example_test_file_loads_for_its_task() -> None:
    for task_file in sorted(EXAMPLES.glob("*/task.json")):
        test = task_file.parent / "test.jsonl"
        task = Task.beside(test)
        assert task is not None and task.name == task_file.parent.name
        assert load_cases(test, need_reference=bool(task.metric)), test
