"""Run a model over a test file and score its answers with a task metric."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams
from graftlm.errors import ConfigError
from graftlm.eval.metrics import METRICS
from graftlm.progress import progress
from graftlm.train.data import DataError, read_jsonl


@dataclass(frozen=True)
class Task:
    """What `task.json` beside a dataset says: how to score it and how long answers may be."""

    name: str
    metric: str
    max_new_tokens: int = 64
    train: dict[str, float] = field(default_factory=dict)  # TrainConfig settings that suit the task

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")

    @classmethod
    def beside(cls, data: Path) -> Task | None:
        path = data.parent / "task.json"
        if not path.is_file():
            return None
        d = json.loads(path.read_text())
        return cls(d.get("name", data.parent.name), d["metric"], int(d.get("max_new_tokens", 64)), d.get("train", {}))


@dataclass
class EvalResult:
    metric: str
    score: float  # mean over examples
    n: int
    seconds: float
    predictions: list[tuple[str, str, float]] = field(default_factory=list)  # (prediction, reference, score)


def load_cases(path: Path, limit: int = 0) -> list[tuple[list[dict[str, str]], str]]:
    """(messages before the last assistant turn, that turn's content) for every line."""
    cases = []
    for n, obj in read_jsonl(path):
        if "messages" in obj:
            msgs = obj["messages"]
            if not msgs or msgs[-1].get("role") != "assistant":
                raise DataError(f"{path}:{n}: an evaluation line must end with the assistant's reference answer")
            cases.append(([{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"]))
        elif "prompt" in obj and "completion" in obj:
            cases.append(([{"role": "user", "content": obj["prompt"]}], obj["completion"]))
        else:
            raise DataError(f"{path}:{n}: an evaluation line needs 'messages' or 'prompt' and 'completion'")
        if limit and len(cases) >= limit:
            break
    return cases


def evaluate(
    gen: Generator, path: Path, task: Task, batch_size: int = 16, limit: int = 0, label: str = "evaluating"
) -> EvalResult:
    cases = load_cases(path, limit)
    metric = METRICS[task.metric]
    prompts = [gen.tokenizer.encode_chat(msgs) for msgs, _ in cases]
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
    scored = [(answers[i], ref, metric(answers[i], ref)) for i, (_, ref) in enumerate(cases)]
    return EvalResult(
        task.metric, sum(s for *_, s in scored) / len(scored), len(scored), time.perf_counter() - t0, scored
    )
