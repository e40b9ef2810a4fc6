"""Checkpoint directories: sharded, other dtypes, written back, and broken ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from graftlm.errors import CorruptModelError, UnsupportedModelError
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.model.load_hf import hf_state_dict, save_checkpoint
from tests.conftest import write_tiny_checkpoint


def test_sharded_bf16_checkpoint_loads(tmp_path: Path) -> None:
    src = write_tiny_checkpoint(tmp_path / "src", tie_word_embeddings=False)
    ref = LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    shard_dir = tmp_path / "sharded"
    ref.save_pretrained(shard_dir, max_shard_size="50KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, shard_dir / f)
    assert (shard_dir / "model.safetensors.index.json").exists()
    model, _ = load_checkpoint(shard_dir)
    assert model.embed_tokens.weight.dtype == torch.float32
    tokens = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        want = ref.float()(tokens).logits
        assert float((model(tokens) - want).abs().max()) <= 1e-4


def test_saved_checkpoint_round_trips_through_transformers(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    out = tmp_path / "copy"
    save_checkpoint(out, model.config, hf_state_dict(model), tok)
    ref = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert float((model(tokens) - ref(tokens).logits).abs().max()) <= 1e-4
    assert not list(tmp_path.glob(".copy.*"))  # no temporary directory left behind


def test_missing_tensor_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    state = load_file(str(bad / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CorruptModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(bad)


def test_shape_mismatch_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptModelError, match=r"proj\.weight.*has shape"):
        load_checkpoint(bad)


def test_truncated_safetensors_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelError, match="cannot read weights"):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
        ({"model_type": "mistral", "sliding_window": 16}, "sliding-window"),
    ],
)
def test_unsupported_features_are_named(tiny_dir: Path, tmp_path: Path, change: dict, match: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=match):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
)
def test_written_rope_scaling_reads_back_in_transformers(tmp_path: Path, rope: dict) -> None:
    src = write_tiny_checkpoint(tmp_path / "src", rope_scaling=rope)
    model, tok = load_checkpoint(src)
    save_checkpoint(tmp_path / "out", model.config, hf_state_dict(model), tok)
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (1, 100))
    with torch.no_grad():
        assert float((model(tokens) - ref(tokens).logits).abs().max()) <= 1e-4


def test_transformers_4_config_layout_is_read() -> None:
    from graftlm.model.config import LlamaConfig

    cfg = LlamaConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": {"type": "linear", "factor": 4.0},
            "eos_token_id": [2, 3],
        }
    )
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 4.0
    assert cfg.num_key_value_heads == 2 and cfg.eos_token_id == (2, 3)
