"""Bake an adapter into its base model: for single-adapter evaluation, and as a checkpoint on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from graftlm.loading import catalog
from graftlm.lora.model import merge_lora
from graftlm.lora.peft_io import apply_adapter, read_adapter
from graftlm.model.llama import Llama
from graftlm.model.load_hf import hf_state_dict, save_checkpoint
from graftlm.model.tokenizer import Tokenizer


def load_merged(
    model_name: str,
    adapter: Path | None,
    force: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Llama, Tokenizer, catalog.ModelSource]:
    """The base model, with `adapter` merged into its weights when one is given."""
    model, tok, source = catalog.load(model_name, dtype, device)
    if adapter is not None:
        apply_adapter(model, read_adapter(adapter), force)
        merge_lora(model)
    return model, tok, source


def write_merged(model_name: str, adapter: Path, out: Path, force: bool = False) -> None:
    """A Hugging Face checkpoint directory with the adapter baked in (transformers loads it)."""
    model, tok, source = load_merged(model_name, adapter, force)
    note = {"base_model": source.name, "adapter": str(adapter)}
    save_checkpoint(
        out, model.config, hf_state_dict(model), tok, extra_files={"graftlm_merge.json": json.dumps(note, indent=2)}
    )
