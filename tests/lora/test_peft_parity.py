"""Adapters move both ways between graftlm and PEFT with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import add_lora, lora_layers, lora_state_dict
from graftlm.lora.peft_io import apply_adapter, read_adapter, save_adapter

CASES = {
    "all-projections": LoraConfig(r=8, alpha=16),
    "some-layers-rslora": LoraConfig(
        r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), layers=(1,), use_rslora=True
    ),
    "dora": LoraConfig(r=4, alpha=8, targets=("q_proj", "k_proj", "o_proj", "up_proj"), use_dora=True),
    "rank-pattern": LoraConfig(r=8, alpha=16, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 4}),
}


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(CASES))
def test_graftlm_adapter_loads_in_peft(tiny_dir: Path, tmp_path: Path, name: str) -> None:
    config = CASES[name]
    model, _ = load_checkpoint(tiny_dir)
    add_lora(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0, 0.1)  # B starts at zero; make the adapter do something
            if layer.magnitude is not None:
                layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    save_adapter(tmp_path / "a", config, lora_state_dict(model), model.fingerprint())

    ours, _ = load_checkpoint(tiny_dir)
    apply_adapter(ours, read_adapter(tmp_path / "a"))
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), tmp_path / "a")
    tokens = _tokens(ours.config.vocab_size)
    with torch.no_grad():
        want = ref(tokens).logits
        base = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)(tokens).logits
        assert float((want - base).abs().max()) > 1e-2  # the adapter changes the output
        assert float((ours(tokens) - want).abs().max()) <= 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_peft_adapter_loads_in_graftlm(tiny_dir: Path, tmp_path: Path, name: str) -> None:
    c = CASES["all-projections" if name == "shared-prefix" else name]
    peft_cfg = PeftLoraConfig(
        r=c.r,
        lora_alpha=c.alpha,
        target_modules=list(c.targets),
        use_rslora=c.use_rslora,
        use_dora=c.use_dora,
        layers_to_transform=list(c.layers) if c.layers else None,
        rank_pattern=c.rank_pattern,
        alpha_pattern=c.alpha_pattern,
        init_lora_weights=False,  # random B, so the adapter is not a no-op
    )
    torch.manual_seed(1)
    ref = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), peft_cfg).eval()
    ref.save_pretrained(tmp_path / "p")

    ours, _ = load_checkpoint(tiny_dir)
    adapter = read_adapter(tmp_path / "p")
    assert adapter.base_fingerprint is None
    apply_adapter(ours, adapter)
    tokens = _tokens(ours.config.vocab_size)
    with torch.no_grad():
        assert float((ours(tokens) - ref(tokens).logits).abs().max()) <= 1e-4


@pytest.mark.parametrize("name", ["all-projections", "dora", "shared-prefix"])
def test_training_gradients_equal_peft(tiny_dir: Path, name: str) -> None:
    """One loss on the completion half: graftlm's training path gives PEFT's gradients for every A and B,
    also where the rows begin alike and graftlm runs that prefix once for both."""
    from graftlm.train.data import Batch
    from graftlm.train.losses import completion_loss, shared_prefix

    c = CASES["all-projections" if name == "shared-prefix" else name]
    peft_cfg = PeftLoraConfig(
        r=c.r, lora_alpha=c.alpha, target_modules=list(c.targets), use_dora=c.use_dora, init_lora_weights=False
    )
    torch.manual_seed(2)
    ref = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), peft_cfg)
    ours, _ = load_checkpoint(tiny_dir)
    add_lora(ours, c)
    peft_state = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        for path, layer in lora_layers(ours):
            layer.lora_A.copy_(peft_state[f"base_model.model.{path}.lora_A.default.weight"])
            layer.lora_B.copy_(peft_state[f"base_model.model.{path}.lora_B.default.weight"])
            if layer.magnitude is not None:
                layer.magnitude.copy_(peft_state[f"base_model.model.{path}.lora_magnitude_vector.default.weight"])
    tokens = _tokens(ours.config.vocab_size)
    if name == "shared-prefix":
        tokens[1, :9] = tokens[0, :9]
    targets = torch.zeros_like(tokens, dtype=torch.bool)
    targets[:, 10:] = True
    assert shared_prefix(ours, Batch(tokens, targets, tokens.numel())) == (9 if name == "shared-prefix" else 0)
    labels = tokens.masked_fill(~targets, -100)

    ref.train()
    ref(input_ids=tokens, labels=labels).loss.backward()  # mean over the scored tokens
    loss, n = completion_loss(ours, Batch(tokens, targets, tokens.numel()))
    (loss / n).backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    for path, layer in lora_layers(ours):
        pairs = [(layer.lora_A, "lora_A"), (layer.lora_B, "lora_B"), (layer.magnitude, "lora_magnitude_vector")]
        for mine, key in pairs if layer.magnitude is not None else pairs[:2]:
            want = grads[f"base_model.model.{path}.{key}.default.weight"]
            torch.testing.assert_close(mine.grad, want, rtol=1e-3, atol=1e-5)
