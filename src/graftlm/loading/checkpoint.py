"""Load any checkpoint directory graftlm writes or reads: a Hugging Face one as it is, a palettized one
with its palettized layers swapped in before the weights load (as gpt-fast's loader does)."""

from __future__ import annotations

from pathlib import Path

import torch

from graftlm.loading.palettized import LAYOUT_FILE, read_layout
from graftlm.model.llama import Llama
from graftlm.model.load_hf import read_checkpoint
from graftlm.model.tokenizer import Tokenizer


def load_checkpoint(
    path: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[Llama, Tokenizer]:
    """Load a Hugging Face Llama-family checkpoint directory, palettized or not."""
    prepare = read_layout(path).prepare(dtype) if (path / LAYOUT_FILE).exists() else None
    return read_checkpoint(path, dtype, device, prepare)


def is_palettized(path: Path) -> bool:
    """Was the checkpoint directory at `path` written by `graftlm palettize`?"""
    return (path / LAYOUT_FILE).exists()
