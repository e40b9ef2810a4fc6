"""Our forward against transformers' LlamaForCausalLM built from the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from graftlm.engine.kv_cache import KVCache
from graftlm.loading.checkpoint import load_checkpoint
from tests.conftest import write_tiny_checkpoint


def _compare(path: Path, seq: int = 17) -> float:
    ours, _ = load_checkpoint(path)
    ref = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (3, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(tokens).logits
        got = ours(tokens)
    return float((want - got).abs().max())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": False},
        {"num_key_value_heads": 4},
        {"num_key_value_heads": 1, "head_dim": 32},
        {"attention_bias": True, "mlp_bias": True},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ],
    ids=["tied-gqa", "untied", "mha", "mqa-headdim", "bias", "rope-linear", "rope-llama3"],
)
def test_logits_match_transformers(tmp_path: Path, overrides: dict) -> None:
    path = write_tiny_checkpoint(tmp_path, **overrides)
    assert _compare(path, seq=100) <= 1e-4


def test_kv_cache_decode_matches_full_forward(tiny_dir: Path) -> None:
    model, _ = load_checkpoint(tiny_dir)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, 2, 12)
        parts = [model(tokens[:, :5], cache=cache)]
        parts += [model(tokens[:, i : i + 1], cache=cache, start=i) for i in range(5, 12)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-4)


def test_tied_embeddings_share_storage(tiny_dir: Path) -> None:
    model, _ = load_checkpoint(tiny_dir)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_silu_mul_gradient_equals_autograd() -> None:
    from graftlm.model.llama import silu_mul

    torch.manual_seed(0)
    gate = (torch.randn(4, 7, 33) * 4).requires_grad_()
    up = torch.randn(4, 7, 33, requires_grad=True)
    grad = torch.randn(4, 7, 33)
    (silu_mul(gate, up) * grad).sum().backward()
    g_ref, u_ref = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    (torch.nn.functional.silu(g_ref) * u_ref * grad).sum().backward()
    torch.testing.assert_close(gate.grad, g_ref.grad)
    torch.testing.assert_close(up.grad, u_ref.grad)


def test_rms_norm_gradients_equal_autograd() -> None:
    from graftlm.model.llama import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(33, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(33))
    x = (torch.randn(4, 7, 33) * 3).requires_grad_()
    grad = torch.randn(4, 7, 33)
    (norm(x) * grad).sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    want = w_ref * x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + 1e-5)  # HF's LlamaRMSNorm
    (want * grad).sum().backward()
    torch.testing.assert_close(norm(x), want)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad)


def test_rotary_gradient_equals_autograd() -> None:
    from graftlm.model.rope import apply_rotary

    torch.manual_seed(0)
    angles = torch.randn(2, 1, 5, 8)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x = torch.randn(2, 5, 3, 16).transpose(1, 2).requires_grad_()  # [B, H, S, D], strided as in attention
    grad = torch.randn(2, 3, 5, 16)
    (apply_rotary(x, cos, sin) * grad).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    want = x_ref * cos + torch.cat([-x_ref[..., 8:], x_ref[..., :8]], -1) * sin  # HF's rotate_half form
    (want * grad).sum().backward()
    assert torch.equal(apply_rotary(x, cos, sin), want)  # rounded as HF rounds it
    torch.testing.assert_close(x.grad, x_ref.grad)
