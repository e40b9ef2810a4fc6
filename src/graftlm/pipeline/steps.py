"""The pipeline's two heavy steps, over the training and evaluation code that the CLI also uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graftlm.engine.generate import Generator
from graftlm.eval.answers import Contestant
from graftlm.eval.judge import JudgeConfig
from graftlm.eval.runner import Task, evaluate
from graftlm.eval.safety import PROMPTS
from graftlm.eval.suite import Plan, load_sets, run_suite
from graftlm.loading.catalog import Placement
from graftlm.loading.merged import load_merged
from graftlm.lora.config import TARGETS, LoraConfig
from graftlm.pipeline.spec import AdapterSpec
from graftlm.train.sft import DataSpec, train_adapter
from graftlm.train.trainer import TrainConfig

# A task.json's suggested training settings use TrainConfig's names; the spec uses the CLI's.
TASK_NAMES = {"batch_size": "batch"}


def train_settings(a: AdapterSpec) -> tuple[LoraConfig, TrainConfig]:
    task = Task.beside(a.train_file)
    s = {TASK_NAMES.get(k, k): v for k, v in (task.train if task else {}).items()} | a.train
    rank = int(s.get("rank", 16))
    lora = LoraConfig(
        r=rank,
        alpha=float(s.get("alpha", 2.0 * rank)),
        dropout=float(s.get("dropout", 0.0)),
        targets=tuple(s.get("targets", TARGETS)),
        layers=tuple(s["layers"]) if "layers" in s else None,
        use_rslora=bool(s.get("rslora", False)),
        use_dora=bool(s.get("dora", False)),
    )
    config = TrainConfig(
        lr=float(s.get("lr", 2e-4)),
        epochs=int(s.get("epochs", 1)),
        batch_size=int(s.get("batch", 8)),
        grad_accum=int(s.get("grad_accum", 1)),
        max_length=int(s["max_length"]) if "max_length" in s else None,  # None: auto, from the data
        warmup=float(s.get("warmup", 0.05)),
        seed=int(s.get("seed", 0)),
        max_steps=int(s.get("max_steps", 0)),
        eval_every=0,
        save_every=0,
    )
    return lora, config


def train(base: str, a: AdapterSpec, out: Path, init_from: Path | None, place: Placement = Placement()) -> None:
    lora, config = train_settings(a)
    data = DataSpec(a.train_file, a.valid_file, str(a.train.get("on_long", "truncate-prompt")))
    train_adapter(base, data, out, lora, config, init_from=init_from, place=place)


def evaluate_adapter(
    base: str, a: AdapterSpec, adapter: Path | None, place: Placement = Placement()
) -> tuple[float, int]:
    """The task metric on the test split, for the base model (`adapter` None) or with the adapter merged."""
    model, tok, _ = load_merged(base, adapter, dtype=place.dtype, device=place.device)
    task = Task(a.name, a.metric, a.max_new_tokens)
    label = f"scoring {a.name}" + ("" if adapter else " (base model)")
    result = evaluate(
        Generator(model, tok), a.test_file, task, int(a.eval.get("batch", 16)), int(a.eval.get("limit", 0)), label
    )
    return result.score, result.n


def grade(
    base: str, a: AdapterSpec, candidate: Path, prod: Path | None, place: Placement = Placement()
) -> dict[str, Any]:
    """`graftlm eval`'s evaluation of a new version: the task metric and the spec's graders, and the side
    by side with prod or the base model its gate asks for; the evaluation document."""
    e = a.eval
    judge = None
    if e.get("judge_url"):
        judge = JudgeConfig(
            url=e["judge_url"], model=e["judge_model"], response_format=e.get("judge_format", "json_schema")
        )
    contestants = [Contestant(a.name, candidate)]
    compare = a.gate.compared
    if compare == "prod" and prod is not None:
        contestants.append(Contestant("prod", prod))
    elif compare == "base":
        contestants.append(Contestant("base"))
    else:
        compare = None  # no prod yet: its rules pass with a note
    plan = Plan(
        (a.metric, *a.graders),
        (Path(e["rubric"]),) if "rubric" in e else (),
        judge,
        compare,
        Path(e.get("safety_prompts", PROMPTS)),
        a.max_new_tokens,
        int(e.get("limit", 0)),
    )
    model, tok, source = place.load(base)
    meta = {"task": a.name, "data": str(a.test_file), "model": source.name}
    sets = load_sets(plan, a.test_file)
    return run_suite(model, tok, contestants, plan, sets, meta, max_batch=int(e.get("batch", 32)))
