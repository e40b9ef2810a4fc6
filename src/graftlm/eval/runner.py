"""Test files, tasks and the single-model scoring loop the pipeline, the demo and the benchmarks use.

`graftlm eval`'s many-model, many-grader run is `graftlm.eval.suite`; both read test files here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams
from graftlm.errors import ConfigError
from graftlm.eval.checks import validate
from graftlm.eval.grade import Case
from graftlm.eval.metrics import METRICS, MetricGrader
from graftlm.progress import progress
from graftlm.train.data import DataError, read_jsonl


@dataclass(frozen=True)
class Task:
    """What `task.json` beside a dataset says: how to score it and how long answers may be."""

    name: str
    metric: str  # "" for a test set graded without references (its graders say how)
    max_new_tokens: int = 64
    train: dict[str, float] = field(default_factory=dict)  # TrainConfig settings that suit the task
    graders: tuple[str, ...] = ()  # graders `graftlm eval` runs when none is named (the metric is always one)
    rubric: Path | None = None  # a rubric file for the judge, relative to task.json

    def __post_init__(self) -> None:
        if self.metric and self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        if not self.metric and not self.graders:
            raise ConfigError(f"task {self.name!r} names no metric and no graders")

    @classmethod
    def beside(cls, data: Path) -> Task | None:
        path = data.parent / "task.json"
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: {e.msg}") from None
        graders = d.get("graders", [])
        if not isinstance(graders, list) or not all(isinstance(g, str) for g in graders):
            raise ConfigError(f"{path}: graders must be a list of grader names")
        rubric = path.parent / d["rubric"] if "rubric" in d else None
        return cls(
            d.get("name", data.parent.name),
            d.get("metric", ""),
            int(d.get("max_new_tokens", 64)),
            d.get("train", {}),
            tuple(graders),
            rubric,
        )


@dataclass
class EvalResult:
    metric: str
    score: float  # mean over examples
    n: int
    seconds: float
    predictions: list[tuple[str, str, float]] = field(default_factory=list)  # (prediction, reference, score)


def load_cases(path: Path, limit: int = 0, need_reference: bool = True) -> list[Case]:
    """Every line of a test file as a case: chat `messages` ending with the reference answer (or without
    one, when no grader needs it), or `prompt` and `completion`. Other keys (`checks`, `category`, ...) are
    kept in `Case.fields`; checks are validated here, before any model runs."""
    cases = []
    for n, obj in read_jsonl(path):
        reference: str | None
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise DataError(f"{path}:{n}: 'messages' must be a list of chat turns")
            has_answer = msgs[-1].get("role") == "assistant"
            if need_reference and not has_answer:
                raise DataError(f"{path}:{n}: an evaluation line must end with the assistant's reference answer")
            turns = msgs[:-1] if has_answer else msgs
            messages = [{"role": m["role"], "content": m["content"]} for m in turns]
            reference = msgs[-1]["content"] if has_answer else None
        elif "prompt" in obj and ("completion" in obj or not need_reference):
            messages, reference = [{"role": "user", "content": obj["prompt"]}], obj.get("completion")
        else:
            raise DataError(f"{path}:{n}: an evaluation line needs 'messages' or 'prompt' and 'completion'")
        fields: dict[str, Any] = {k: v for k, v in obj.items() if k not in ("messages", "prompt", "completion")}
        if "checks" in fields:
            if not isinstance(fields["checks"], list):
                raise DataError(f"{path}:{n}: 'checks' must be a list")
            for c in fields["checks"]:
                validate(c, f"{path}:{n}")
        cases.append(Case(messages, reference, fields))
        if limit and len(cases) >= limit:
            break
    return cases


def evaluate(
    gen: Generator, path: Path, task: Task, batch_size: int = 16, limit: int = 0, label: str = "evaluating"
) -> EvalResult:
    """One model's greedy answers to a test file, scored with the task metric."""
    cases = load_cases(path, limit)
    prompts = [gen.tokenizer.encode_chat(c.messages) for c in cases]
    order = sorted(range(len(cases)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    params = SamplingParams(max_new_tokens=task.max_new_tokens)
    answers: dict[int, str] = {}
    t0 = time.perf_counter()
    with progress(label, len(cases), "examples") as p:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            for i, out in zip(idx, gen.generate([prompts[i] for i in idx], params), strict=True):
                answers[i] = out.text.strip()
            p.advance(len(idx))
    outputs = [answers[i] for i in range(len(cases))]
    grades = MetricGrader(task.metric).grade(cases, outputs)
    scored = [(o, c.reference or "", g.score) for o, c, g in zip(outputs, cases, grades, strict=True)]
    return EvalResult(
        task.metric, sum(s for *_, s in scored) / len(scored), len(scored), time.perf_counter() - t0, scored
    )
