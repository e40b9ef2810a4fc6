"""Training checkpoints for `--resume`: LoRA weights, AdamW state, step and RNG, in safetensors + JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from graftlm.errors import GraftlmError
from graftlm.fileio import atomic_dir

STATE_FILE, TENSORS_FILE = "state.json", "tensors.safetensors"


def save_checkpoint(
    path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Write everything needed to continue training exactly where it stopped."""
    tensors: dict[str, torch.Tensor] = {f"param/{k}": p.detach().cpu() for k, p in params.items()}
    index = {id(p): k for k, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"adam/{index[id(p)]}/{name}"] = t.detach().cpu()
    tensors["rng/torch"] = torch.get_rng_state()
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_checkpoint(
    path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore parameters, optimizer state and RNG; return the saved loop state."""
    if not (path / STATE_FILE).is_file():
        raise GraftlmError(f"no checkpoint to resume from at {path}")
    tensors = load_file(str(path / TENSORS_FILE))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param/{k}"])
    for k, p in params.items():
        prefix = f"adam/{k}/"
        st = {n.removeprefix(prefix): v for n, v in tensors.items() if n.startswith(prefix)}
        if st:
            optimizer.state[p] = {n: v.clone() for n, v in st.items()}
    torch.set_rng_state(tensors["rng/torch"])
    return json.loads((path / STATE_FILE).read_text())
