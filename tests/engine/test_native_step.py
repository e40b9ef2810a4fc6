"""The native decode step against the model's forward (the reference): logits, cache and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graftlm.engine.generate import Generator
from graftlm.engine.kv_cache import KVCache
from graftlm.engine.native_step import NativeStep, kernel
from graftlm.engine.sampling import SamplingParams
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import LoraConfig
from graftlm.lora.peft_io import apply_adapter
from graftlm.model.llama import Llama
from graftlm.quant.linear import PalettizedLinear
from tests.lora.helpers import random_adapter
from tests.quant.test_model import palettized_pair

pytestmark = pytest.mark.skipif(kernel() is None, reason="no native step here (needs a compiler, AVX2 and BMI2)")

PROMPT = [5, 9, 14, 3, 22, 7, 31]


def step_both(model: Llama, steps: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(forward's logits, native logits) for each of `steps` tokens after PROMPT, fed the same tokens, with
    both caches compared after every step."""
    n, total = len(PROMPT), len(PROMPT) + steps
    ref_cache, nat_cache = (KVCache(model.config, 1, total, zeroed=True) for _ in range(2))
    out = []
    with torch.inference_mode():
        for cache in (ref_cache, nat_cache):
            model(torch.tensor([PROMPT]), cache=cache)
        native = NativeStep.build(model, nat_cache)
        assert native is not None
        for i in range(steps):
            token = 40 + 3 * i
            ref = model(torch.tensor([[token]]), cache=ref_cache, start=n + i)[0, -1]
            out.append((ref, native([token], n + i)[0]))
    return out


def test_native_step_equals_the_forward_in_float32(tiny_dir: Path) -> None:
    model, _ = load_checkpoint(tiny_dir)
    for ref, got in step_both(model):
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_native_step_with_an_adapter_equals_the_forward(tiny_dir: Path) -> None:
    model, _ = load_checkpoint(tiny_dir)
    adapter = random_adapter(tiny_dir, LoraConfig(r=8, alpha=16), seed=3)  # every projection, B nonzero
    apply_adapter(model, adapter)
    for ref, got in step_both(model):
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [2, 8, 17])
def test_several_tokens_in_one_call_equal_the_forward(tiny_dir: Path, n: int) -> None:
    """A speculative step's verification: n tokens at once, each attending up to its own position."""
    model, _ = load_checkpoint(tiny_dir)
    apply_adapter(model, random_adapter(tiny_dir, LoraConfig(r=4, alpha=8), seed=2))
    tokens = [(7 * i) % 300 + 3 for i in range(n)]
    caches = [KVCache(model.config, 1, len(PROMPT) + n + 1, zeroed=True) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(torch.tensor([PROMPT]), cache=cache)
        ref = model(torch.tensor([tokens]), cache=caches[0], start=len(PROMPT))[0]
        native = NativeStep.build(model, caches[1])
        assert native is not None
        got = native(tokens, len(PROMPT))
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    end = len(PROMPT) + n
    assert torch.allclose(caches[1].k[:, :, :, :end], caches[0].k[:, :, :, :end], atol=1e-5)
    assert torch.allclose(caches[1].v[:, :, :, :end], caches[0].v[:, :, :, :end], atol=1e-5)
    with pytest.raises(ValueError, match="1-17"):
        native([1] * 18, 0)


def test_greedy_tokens_are_those_of_the_forward(tiny_dir: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    native = Generator(model, tok).generate([PROMPT], params)[0].token_ids
    plain = Generator(model, tok, native=False).generate([PROMPT], params)[0].token_ids
    assert native == plain and len(native) == 20


def test_native_step_on_a_palettized_base_equals_the_forward(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the float kernel (every width, 8 bits included) to float rounding; with the integer products,
    as the forward's own integer products."""
    pal, ref_model = palettized_pair(tiny_dir)
    monkeypatch.setattr(PalettizedLinear, "integer_products", False)
    for ref, got in step_both(pal):
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(PalettizedLinear, "integer_products", True)
    dense = step_both(ref_model)
    for (forward, native), (ref, _) in zip(step_both(pal), dense, strict=True):
        # the same integer products: equal but where an activation rounds the other way in 8 bits
        assert float((native - forward).norm() / forward.norm()) < 0.02
        # both within what 8-bit activations cost this random two-layer model (3-11% measured)
        assert float((native - ref).norm() / ref.norm()) < 0.15


def test_what_the_native_step_does_not_cover_decodes_through_the_forward(tiny_dir: Path) -> None:
    model, _ = load_checkpoint(tiny_dir)
    assert NativeStep.build(model, KVCache(model.config, 2, 16)) is None  # two sequences
    dora, _ = load_checkpoint(tiny_dir)
    apply_adapter(dora, random_adapter(tiny_dir, LoraConfig(r=4, alpha=8, use_dora=True), seed=1))
    assert NativeStep.build(dora, KVCache(dora.config, 1, 16)) is None
    half, _ = load_checkpoint(tiny_dir, dtype=torch.bfloat16)
    assert NativeStep.build(half, KVCache(half.config, 1, 16, dtype=torch.bfloat16)) is None
