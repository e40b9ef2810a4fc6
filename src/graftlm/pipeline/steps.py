"""The pipeline's two heavy steps, over the training and evaluation code that the CLI also uses."""

from __future__ import annotations

from pathlib import Path

from graftlm.engine.generate import Generator
from graftlm.eval.runner import Task, evaluate
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


def train(base: str, a: AdapterSpec, out: Path, init_from: Path | None) -> None:
    lora, config = train_settings(a)
    data = DataSpec(a.train_file, a.valid_file, str(a.train.get("on_long", "truncate-prompt")))
    train_adapter(base, data, out, lora, config, init_from=init_from)


def evaluate_adapter(base: str, a: AdapterSpec, adapter: Path | None) -> tuple[float, int]:
    """The task metric on the test split, for the base model (`adapter` None) or with the adapter merged."""
    model, tok, _ = load_merged(base, adapter)
    task = Task(a.name, a.metric, a.max_new_tokens)
    label = f"scoring {a.name}" + ("" if adapter else " (base model)")
    result = evaluate(
        Generator(model, tok), a.test_file, task, int(a.eval.get("batch", 16)), int(a.eval.get("limit", 0)), label
    )
    return result.score, result.n
