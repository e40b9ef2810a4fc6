"""Palettized models against a dense model holding the same dequantized weights (the reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.loading.palettized import read_layout, save_palettized
from graftlm.lora.batched import AdapterBatch
from graftlm.lora.config import LoraConfig
from graftlm.lora.peft_io import apply_adapter
from graftlm.lora.slots import AdapterSlots
from graftlm.model.llama import Llama
from graftlm.quant import lut
from graftlm.quant.linear import PalettizedEmbedding, PalettizedLinear
from graftlm.quant.model import apply_palettes, dense_weights
from graftlm.quant.palette import Palette
from tests.lora.helpers import EIGHT, random_adapter


def palettized_pair(tiny_dir: Path) -> tuple[Llama, Llama]:
    """(palettized model, dense model whose weights are the dequantized palettes), widths mixed."""
    pal, _ = load_checkpoint(tiny_dir)
    ref, _ = load_checkpoint(tiny_dir)
    widths = [2, 3, 4, 6, 8]
    g = torch.Generator().manual_seed(5)
    palettes = {  # every third weight with input scales, the tied embedding among them
        n: Palette.of(
            w,
            widths[i % 5],
            16,
            row_scale=i % 2 == 0,
            in_scales=torch.rand(w.shape[1], generator=g) + 0.5 if i % 3 == 0 else None,
        )
        for i, (n, w) in enumerate(dense_weights(pal))
    }
    apply_palettes(pal, palettes)
    with torch.no_grad():
        for name, w in dense_weights(ref):
            w.copy_(palettes[name].dense())
    return pal, ref


def _tokens(vocab: int, shape: tuple[int, int] = (3, 11)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def float_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests compare with the dense reference to float32 rounding: the float kernel's products. The
    integer products (8-bit activations) have their own tests below and in test_palette.py."""
    monkeypatch.setattr(PalettizedLinear, "integer_products", False)


@pytest.mark.parametrize("kernel", [True, False])
def test_palettized_forward_equals_dense_reference(
    tiny_dir: Path, kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not kernel:
        monkeypatch.setattr(lut, "usable", lambda *t: False)
    pal, ref = palettized_pair(tiny_dir)
    assert isinstance(pal.embed_tokens, PalettizedEmbedding) and pal.lm_head is pal.embed_tokens.lut
    x = _tokens(pal.config.vocab_size)
    with torch.no_grad():
        assert (pal(x) - ref(x)).abs().max() <= 1e-4
        one = x[:1, :1]  # one row: the fused kernel path
        assert (pal(one) - ref(one)).abs().max() <= 1e-4


def test_integer_products_stay_close_to_the_dense_reference(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PalettizedLinear, "integer_products", True)
    pal, ref = palettized_pair(tiny_dir)
    if not any(m.kernel_tables().integer for m in pal.modules() if isinstance(m, PalettizedLinear)):
        pytest.skip("no integer LUT kernel here (needs a compiler and AVX2 with BMI2)")
    x = _tokens(pal.config.vocab_size, (4, 1))  # four single-token rows: the fused path
    with torch.no_grad():
        got, want = pal(x), ref(x)
    # every projection's product within about 1% (test_palette.py); through the whole model a few percent
    assert float((got - want).norm() / want.norm()) < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


def test_kernel_tables_follow_the_buffers(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tuning writes tables in place and may replace buffers: the kernels' copies must follow."""
    pal, _ = palettized_pair(tiny_dir)
    layer = pal.layers[0].mlp.up_proj
    x = torch.randn(1, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        layer.tables.mul_(2)  # in place
        assert torch.allclose(layer(x), 2 * before, rtol=1e-4, atol=1e-5)
        layer.tables = layer.tables / 2  # a new tensor
        assert torch.allclose(layer(x), before, rtol=1e-4, atol=1e-5)


def test_generation_matches_the_dense_reference(tiny_dir: Path) -> None:
    pal, ref = palettized_pair(tiny_dir)
    _, tok = load_checkpoint(tiny_dir)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    got = [c.token_ids for c in Generator(pal, tok).generate(prompts, params)]
    want = [c.token_ids for c in Generator(ref, tok).generate(prompts, params)]
    assert got == want


def test_save_and_load_round_trip(tiny_dir: Path, tmp_path: Path) -> None:
    pal, _ = palettized_pair(tiny_dir)
    _, tok = load_checkpoint(tiny_dir)
    save_palettized(tmp_path / "pal", pal, tok, {"bits_per_weight": 4.9})
    loaded, _ = load_checkpoint(tmp_path / "pal")
    x = _tokens(pal.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(x), pal(x))
    assert loaded.fingerprint() == pal.fingerprint() != load_checkpoint(tiny_dir)[0].fingerprint()
    assert loaded.lm_head is loaded.embed_tokens.lut  # still one shared table
    assert loaded.num_parameters() == pal.num_parameters()
    layout = read_layout(tmp_path / "pal")
    assert layout.record["bits_per_weight"] == 4.9
    assert {w.bits for w in layout.weights.values()} == {2, 3, 4, 6, 8}
    assert {w.in_scale for w in layout.weights.values()} == {True, False}


def test_lora_on_a_palettized_base_equals_lora_on_the_dense_reference(tiny_dir: Path) -> None:
    pal, ref = palettized_pair(tiny_dir)
    adapter = random_adapter(tiny_dir, LoraConfig(r=8, alpha=16), seed=3)
    apply_adapter(pal, adapter, force=True)
    apply_adapter(ref, adapter, force=True)
    x = _tokens(pal.config.vocab_size)
    assert (pal(x) - ref(x)).abs().max() <= 1e-4
    loss = pal(x).logsumexp(-1).mean()  # gradients reach the adapter through the dequantized weights
    loss.backward()
    grads = [p.grad for n, p in pal.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_batched_multi_adapter_serving_on_a_palettized_base(tiny_dir: Path) -> None:
    pal, ref = palettized_pair(tiny_dir)
    adapters = [random_adapter(tiny_dir, c, seed=i) for i, c in enumerate(EIGHT[:4])]
    for model in (pal, ref):
        slots = AdapterSlots(model, n_slots=4, r_max=16)
        for i, a in enumerate(adapters):
            slots.load(i, a, force=True)
    assert isinstance(pal.layers[0].self_attn.q_proj.base, PalettizedLinear)
    x = _tokens(pal.config.vocab_size, (5, 7))
    batch = AdapterBatch.of([0, 1, -1, 2, 3], "auto")
    with torch.no_grad():
        assert (pal(x, adapters=batch) - ref(x, adapters=batch)).abs().max() <= 1e-4
        step = AdapterBatch.of([3, -1, 0, 1, 2], "auto")  # one token per row: the decode path
        assert (pal(x[:, :1], adapters=step) - ref(x[:, :1], adapters=step)).abs().max() <= 1e-4
