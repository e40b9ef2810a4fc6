"""`graftlm merge` writes a checkpoint that transformers loads with the adapter's behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from graftlm.cli.main import main
from graftlm.lora.config import LoraConfig
from graftlm.lora.peft_io import save_adapter
from tests.lora.helpers import random_adapter


@pytest.mark.parametrize(
    "config", [LoraConfig(r=8, alpha=16), LoraConfig(r=4, alpha=8, use_dora=True)], ids=["lora", "dora"]
)
def test_merged_checkpoint_equals_peft_with_adapter(tiny_dir: Path, tmp_path: Path, config: LoraConfig) -> None:
    a = random_adapter(tiny_dir, config, seed=2)
    save_adapter(tmp_path / "a", a.config, a.tensors, a.base_fingerprint or "")
    assert main(["merge", "-m", str(tiny_dir), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), tmp_path / "a")
    tokens = torch.randint(0, merged.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((merged(tokens).logits - ref(tokens).logits).abs().max()) <= 1e-4


def test_merge_refuses_an_adapter_for_another_base(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import write_tiny_checkpoint

    a = random_adapter(tiny_dir, LoraConfig(r=2, alpha=4), seed=0)
    save_adapter(tmp_path / "a", a.config, a.tensors, a.base_fingerprint or "")
    other = write_tiny_checkpoint(tmp_path / "other", seed=9)
    assert main(["merge", "-m", str(other), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 2
    assert "trained on base model" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
