"""The training loop on the tiny model: it learns, it is reproducible, it resumes exactly."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import lora_state_dict
from graftlm.train.data import collate, load_examples
from graftlm.train.losses import completion_loss
from graftlm.train.trainer import TrainConfig, Trainer, evaluate_loss, lr_factor

PAIRS = [
    ("red", "apple"),
    ("blue", "sky"),
    ("green", "grass"),
    ("black", "night"),
    ("white", "snow"),
    ("yellow", "sun"),
    ("pink", "rose"),
    ("grey", "cloud"),
]


@pytest.fixture(scope="module")
def data(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Colour {c}:", "completion": f" {w}"}) + "\n" for c, w in PAIRS * 2))
    return path


def _trainer(tiny_dir: Path, ckpt: Path | None = None, **kw: object) -> Trainer:
    model, tok = load_checkpoint(tiny_dir)
    cfg = TrainConfig(**{"lr": 1e-2, "epochs": 6, "batch_size": 4, "eval_every": 0, **kw})  # type: ignore[arg-type]
    return Trainer(model, LoraConfig(r=4, alpha=8), cfg, tok.pad_id, ckpt)


def test_loss_matches_transformers_masked_labels(tiny_dir: Path, data: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    batch = collate(load_examples(data, tok, 64)[:4], tok.pad_id)
    loss, n = completion_loss(model, batch)
    labels = batch.tokens.masked_fill(~batch.targets, -100)
    ref = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        want = ref(batch.tokens, labels=labels).loss
    assert abs(float(loss.detach()) / n - float(want)) < 1e-5


def test_training_lowers_the_loss_and_leaves_the_base_alone(tiny_dir: Path, data: Path) -> None:
    trainer = _trainer(tiny_dir)
    tok = load_checkpoint(tiny_dir)[1]
    examples = load_examples(data, tok, 64)
    before_weights = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    before = evaluate_loss(trainer.model, examples, 8, tok.pad_id)
    result = trainer.run(examples, examples)
    assert result.valid_loss is not None and result.valid_loss < before / 3
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before_weights.items())


def test_same_seed_same_adapter(tiny_dir: Path, data: Path) -> None:
    tok = load_checkpoint(tiny_dir)[1]
    examples = load_examples(data, tok, 64)
    runs = []
    for seed in (3, 3, 4):
        t = _trainer(tiny_dir, epochs=1, seed=seed)
        t.run(examples)
        runs.append(lora_state_dict(t.model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_resume_continues_exactly(tiny_dir: Path, data: Path, tmp_path: Path) -> None:
    tok = load_checkpoint(tiny_dir)[1]
    examples = load_examples(data, tok, 64)
    straight = _trainer(tiny_dir, epochs=2, save_every=0)
    straight.run(examples)

    class Crash(Exception):
        pass

    def crash_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise Crash

    first = _trainer(tiny_dir, tmp_path / "ckpt", epochs=2, save_every=3)
    with pytest.raises(Crash):
        first.run(examples, on_step=crash_at_3)
    second = _trainer(tiny_dir, tmp_path / "ckpt", epochs=2, save_every=3)
    result = second.run(examples, resume=True)
    assert result.steps == 8
    want, got = lora_state_dict(straight.model), lora_state_dict(second.model)
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)


def test_schedule_warms_up_then_decays() -> None:
    values = [lr_factor(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[55] == pytest.approx(0.5, abs=0.01)
    assert all(a >= b for a, b in itertools.pairwise(values[10:])) and values[-1] < 0.01


def test_bad_training_settings_are_refused() -> None:
    for bad in ({"lr": 0}, {"batch_size": 0}, {"warmup": 1.5}, {"epochs": 0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)  # type: ignore[arg-type]


def test_a_task_adapter_can_start_from_another_adapter(tiny_dir: Path, data: Path) -> None:
    from graftlm.lora.config import AdapterError
    from tests.lora.helpers import random_adapter

    start = random_adapter(tiny_dir, LoraConfig(r=4, alpha=8, targets=("q_proj", "down_proj")), seed=5)
    model, tok = load_checkpoint(tiny_dir)
    trainer = Trainer(model, start.config, TrainConfig(max_steps=2, lr=1e-3), tok.pad_id, init=start)
    before = lora_state_dict(model)
    assert before.keys() == start.tensors.keys()
    assert all(torch.equal(before[k], start.tensors[k]) for k in before)
    examples = load_examples(data, tok, 64)
    trainer.run(examples)
    after = lora_state_dict(model)
    assert any(not torch.equal(after[k], start.tensors[k]) for k in after)  # trained on from there
    with pytest.raises(AdapterError, match="takes its settings"):
        Trainer(load_checkpoint(tiny_dir)[0], LoraConfig(r=8), TrainConfig(), 0, init=start)


def test_recomputed_layers_give_the_same_gradients(tiny_dir: Path, data: Path) -> None:
    """Activation checkpointing trades time for memory only: the loss and every LoRA gradient are those
    of the plain backward pass, with a shared prefix and without."""
    trainer = _trainer(tiny_dir)
    tok = load_checkpoint(tiny_dir)[1]
    batch = collate(load_examples(data, tok, 64)[:4], tok.pad_id)
    results = []
    for recompute in (0, 1, 2):
        trainer.model.recompute = recompute
        loss, _ = completion_loss(trainer.model, batch)
        loss.backward()
        results.append((float(loss.detach()), {k: p.grad.clone() for k, p in trainer.params.items()}))
        trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.recompute = 0
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        for k, g in grads.items():
            torch.testing.assert_close(g, results[0][1][k], rtol=1e-5, atol=1e-7)


def test_auto_recomputes_only_the_layers_a_batch_needs(tiny_dir: Path) -> None:
    from graftlm.train.trainer import recomputed_layers

    model, _ = load_checkpoint(tiny_dir)
    auto = TrainConfig(activation_mb=1.0)
    assert recomputed_layers(model, 16, auto) == 0  # a small batch keeps everything
    assert 0 < recomputed_layers(model, 1024, auto) <= 2
    assert recomputed_layers(model, 10**6, auto) == 2  # never more than the model has
    assert recomputed_layers(model, 16, TrainConfig(checkpoint_layers=-1)) == 2
    assert recomputed_layers(model, 10**6, TrainConfig(checkpoint_layers=0)) == 0
