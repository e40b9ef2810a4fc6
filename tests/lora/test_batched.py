"""A batch where every row has its own adapter equals each row alone on its merged model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.batched import AdapterBatch
from graftlm.lora.config import AdapterError
from graftlm.lora.model import merge_lora
from graftlm.lora.peft_io import apply_adapter
from graftlm.lora.slots import AdapterSlots
from tests.lora.helpers import EIGHT, random_adapter


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path) -> list:
    return [random_adapter(tiny_dir, c, seed=i) for i, c in enumerate(EIGHT)]


def _merged_logits(tiny_dir: Path, adapter, tokens: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    model, _ = load_checkpoint(tiny_dir)
    if adapter is not None:
        apply_adapter(model, adapter)
        merge_lora(model)
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]


@pytest.mark.parametrize("strategy", ["auto", "kernel", "gather", "grouped", "reference"])
def test_mixed_batch_equals_each_row_merged(tiny_dir: Path, adapters: list, strategy: str) -> None:
    model, _ = load_checkpoint(tiny_dir)
    slots = AdapterSlots(model, n_slots=8, r_max=16)
    for i, a in enumerate(adapters):
        slots.load(7 - i, a)  # slot order differs from adapter order
    # ten rows: the eight adapters (one twice), two base rows; all lengths differ
    row_adapter = [0, 1, None, 2, 3, 4, 5, None, 6, 7, 3]
    g = torch.Generator().manual_seed(0)
    lengths = [5 + 3 * i for i in range(len(row_adapter))]
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.tensor(p)
        valid[i, width - len(p) :] = True
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    batch = AdapterBatch.of([-1 if a is None else 7 - a for a in row_adapter], strategy)
    with torch.no_grad():
        got = model(tokens, positions, key_valid=valid, adapters=batch)
    for i, (a, p) in enumerate(zip(row_adapter, prompts, strict=True)):
        want = _merged_logits(tiny_dir, None if a is None else adapters[a], p)
        diff = (got[i, width - len(p) :] - want).abs().max()
        assert float(diff) <= 1e-4, (i, a, float(diff))


def test_adapters_change_their_rows_only(tiny_dir: Path, adapters: list) -> None:
    model, _ = load_checkpoint(tiny_dir)
    tokens = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(tokens)
        slots = AdapterSlots(model, n_slots=2)
        slots.load(1, adapters[0])
        out = model(tokens, adapters=AdapterBatch.of([-1, 1, -1]))
        assert torch.allclose(out[0], base[0], atol=1e-5) and torch.allclose(out[2], base[2], atol=1e-5)
        assert float((out[1] - base[1]).abs().max()) > 1e-2
        slots.clear(1)
        assert torch.allclose(model(tokens, adapters=AdapterBatch.of([-1, 1, -1])), base, atol=1e-5)


def test_rank_above_slot_maximum_is_refused(tiny_dir: Path, adapters: list) -> None:
    model, _ = load_checkpoint(tiny_dir)
    slots = AdapterSlots(model, n_slots=1, r_max=8)
    with pytest.raises(AdapterError, match="rank 16"):
        slots.load(0, adapters[0])


def test_adapter_for_another_base_is_refused(tiny_dir: Path, tmp_path: Path, adapters: list) -> None:
    from tests.conftest import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", seed=5)
    model, _ = load_checkpoint(other)
    slots = AdapterSlots(model, n_slots=1)
    with pytest.raises(AdapterError, match="trained on base model"):
        slots.load(0, adapters[0])
    slots.load(0, adapters[0], force=True)  # the shapes fit, so forcing works


@pytest.mark.parametrize("strategy", ["kernel", "gather", "grouped", "reference"])
def test_weighted_composition_equals_hand_merged_weights(tiny_dir: Path, adapters: list, strategy: str) -> None:
    # rows: 0.7·adapter0 + 0.5·adapter1; adapter2 alone; base; -0.3·adapter4 + adapter6
    mixes = [[(0, 0.7), (1, 0.5)], [(2, 1.0)], [], [(4, -0.3), (6, 1.0)]]
    model, _ = load_checkpoint(tiny_dir)
    slots = AdapterSlots(model, n_slots=8)
    for i in (0, 1, 2, 4, 6):
        slots.load(i, adapters[i])
    tokens = torch.randint(0, model.config.vocab_size, (len(mixes), 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(tokens, adapters=AdapterBatch.of(mixes, strategy))
    for row, mix in enumerate(mixes):
        ref, _ = load_checkpoint(tiny_dir)
        with torch.no_grad():
            for i, w in mix:
                a = adapters[i]
                for path in a.modules():
                    key = f"base_model.model.{path}"
                    proj = ref.get_submodule(path.removeprefix("model."))
                    delta = a.tensors[f"{key}.lora_B.weight"] @ a.tensors[f"{key}.lora_A.weight"]
                    proj.weight += w * a.config.scale(path) * delta
            want = ref(tokens[row : row + 1])[0]
        assert float((got[row] - want).abs().max()) <= 1e-4, row


def test_kernel_is_built_here_and_bf16_slots_are_exact_for_bf16_adapters(tiny_dir: Path, adapters: list) -> None:
    from graftlm.lora.bgmv import kernel

    assert kernel() is not None  # a C compiler is part of this project's machines; see bgmv.py otherwise
    rounded = []
    for a in adapters[:5]:  # stored in bf16, as save_adapter writes them
        t = {k: v.to(torch.bfloat16).float() for k, v in a.tensors.items()}
        rounded.append(type(a)(a.config, t, a.base_fingerprint, a.path))
    model, _ = load_checkpoint(tiny_dir)
    slots = AdapterSlots(model, n_slots=5, dtype=torch.bfloat16)
    for i, a in enumerate(rounded):
        slots.load(i, a)
    tokens = torch.randint(0, model.config.vocab_size, (6, 1), generator=torch.Generator().manual_seed(4))
    rows = [0, 1, 2, 3, 4, -1]
    with torch.no_grad():
        got = model(tokens, adapters=AdapterBatch.of(rows, "kernel"))
    for i, a in enumerate(rows):
        want = _merged_logits(tiny_dir, None if a < 0 else rounded[a], tokens[i].tolist())
        assert float((got[i] - want).abs().max()) <= 1e-4, i


def test_without_a_compiler_auto_falls_back_to_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    from graftlm.lora import bgmv

    monkeypatch.setenv("GRAFTLM_KERNEL", "never")
    bgmv.kernel.cache_clear()
    try:
        assert AdapterBatch.of([0, 1, 2]).strategy == "gather"
        assert AdapterBatch.of([0, 1, 2], "kernel").strategy == "gather"
    finally:
        monkeypatch.delenv("GRAFTLM_KERNEL")
        bgmv.kernel.cache_clear()
    assert AdapterBatch.of([0, 1, 2]).strategy == "kernel"


def test_off_the_cpu_auto_and_kernel_choose_gather_without_reading_the_slots() -> None:
    """Tensors on the meta device hold no data: a choice that read the slots (host syncs on a GPU) fails."""
    for strategy in ("auto", "kernel"):
        batch = AdapterBatch.of([0, 1, 1, 2, -1] * 8, strategy, device="meta")
        assert batch.strategy == "gather" and batch.slots.device.type == "meta"


def test_contiguous_runs_add_in_place_and_equal_merged(tiny_dir: Path, adapters: list) -> None:
    model, _ = load_checkpoint(tiny_dir)
    slots = AdapterSlots(model, n_slots=3)
    for i in range(3):
        slots.load(i, adapters[i])
    rows = [0, 0, 2, 2, 2, -1, 1]  # runs per adapter, as packed prefill lays them out
    batch = AdapterBatch.of(rows, "grouped")
    assert batch.runs() == [(0, 0, 2), (1, 6, 7), (2, 2, 5)]
    assert AdapterBatch.of([0, 1, 0], "grouped").runs() is None
    tokens = torch.randint(0, model.config.vocab_size, (len(rows), 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(tokens, adapters=batch)
    for i, a in enumerate(rows):
        want = _merged_logits(tiny_dir, None if a < 0 else adapters[a], tokens[i].tolist())
        assert float((got[i] - want).abs().max()) <= 1e-4, i
