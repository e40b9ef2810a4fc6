"""The engine, the multi-adapter strategies and a training step on a CUDA GPU give the CPU's results.

Run on a GPU machine: `pytest tests/gpu -rs`. Without a GPU every test here is skipped with the reason
(`GRAFTLM_TEST_DEVICE=cpu` runs them against the CPU as a dry run); the CPU-side checks for device mistakes
live beside the code they check (tests/train, tests/lora)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from graftlm.engine.engine import Engine, EngineConfig
from graftlm.engine.offline import Job, run_jobs
from graftlm.engine.sampling import SamplingParams
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.batched import AdapterBatch
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import lora_state_dict
from graftlm.lora.peft_io import save_adapter
from graftlm.lora.slots import AdapterSlots
from graftlm.train.data import load_examples
from graftlm.train.trainer import TrainConfig, Trainer
from tests.lora.helpers import EIGHT, random_adapter

CUDA = os.environ.get("GRAFTLM_TEST_DEVICE", "cuda")  # GRAFTLM_TEST_DEVICE=cpu: a dry run of this module
pytestmark = pytest.mark.skipif(
    CUDA.startswith("cuda") and not torch.cuda.is_available(),
    reason=f"no CUDA GPU visible to torch {torch.__version__}: run on a GPU machine",
)


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path) -> list:
    return [random_adapter(tiny_dir, c, seed=i) for i, c in enumerate(EIGHT)]


def _mixed_logits(tiny_dir: Path, adapters: list, device: str, strategy: str) -> torch.Tensor:
    model, _ = load_checkpoint(tiny_dir, device=device)
    slots = AdapterSlots(model, n_slots=8, r_max=16)
    for i, a in enumerate(adapters):
        slots.load(i, a)
    g = torch.Generator().manual_seed(0)
    rows = [0, 1, -1, 2, 3, 4, 5, -1, 6, 7, 3]
    tokens = torch.randint(0, model.config.vocab_size, (len(rows), 12), generator=g).to(device)
    with torch.no_grad():
        return model(tokens, adapters=AdapterBatch.of(rows, strategy, device)).float().cpu()


@pytest.mark.parametrize("strategy", ["auto", "kernel", "gather", "grouped", "reference"])
def test_mixed_adapter_batch_on_the_gpu_equals_the_cpu(tiny_dir: Path, adapters: list, strategy: str) -> None:
    want = _mixed_logits(tiny_dir, adapters, "cpu", "reference")
    got = _mixed_logits(tiny_dir, adapters, CUDA, strategy)  # "kernel" (the C one) must step aside on CUDA
    assert (got - want).abs().max() <= 1e-3


def test_the_engine_on_the_gpu_answers_as_on_the_cpu(tiny_dir: Path, tmp_path: Path) -> None:
    for i, config in enumerate(EIGHT[:4]):
        a = random_adapter(tiny_dir, config, seed=i)
        save_adapter(tmp_path / f"a{i}", config, a.tensors, a.base_fingerprint)
    answers = {}
    for device in ("cpu", CUDA):
        model, tok = load_checkpoint(tiny_dir, device=device)
        engine = Engine(model, tok, EngineConfig(max_batch=8, max_len=64, prefill_tokens=16), tmp_path).start()
        try:
            jobs = [
                Job(
                    tok.encode(f"request {n}"),
                    SamplingParams(max_new_tokens=12),
                    () if n % 5 == 4 else ((engine.cache.resolve(f"a{n % 4}"), 1.0),),
                )
                for n in range(12)
            ]
            answers[device] = [f.token_ids for f in run_jobs(engine, jobs)]
        finally:
            engine.stop()
    assert answers[CUDA] == answers["cpu"]


def test_a_training_step_on_the_gpu_equals_the_cpu(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"prompt": "Colour {c}:", "completion": " {w}"}}\n' for c, w in [("red", "apple")] * 8))
    states = {}
    for device in ("cpu", CUDA):
        torch.manual_seed(0)
        model, tok = load_checkpoint(tiny_dir, device=device)
        trainer = Trainer(model, LoraConfig(r=4, alpha=8), TrainConfig(lr=1e-2, max_steps=3, batch_size=4), tok.pad_id)
        trainer.run(load_examples(data, tok, 64))
        states[device] = {k: v.float().cpu() for k, v in lora_state_dict(model).items()}
    for k, want in states["cpu"].items():
        assert (states[CUDA][k] - want).abs().max() <= 1e-4, k
