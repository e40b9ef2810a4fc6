"""Read and write Hugging Face checkpoint directories: config.json, safetensors (single or sharded)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from graftlm.errors import CorruptModelError
from graftlm.fileio import atomic_dir
from graftlm.model.config import LlamaConfig
from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Keys that older checkpoints carry but that we derive ourselves.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_ours(key: str) -> str:
    return key.removeprefix("model.")


def ours_to_hf(key: str) -> str:
    return key if key.startswith("lm_head.") else f"model.{key}"


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CorruptModelError(f"cannot read shard index {index}: {e}") from e
        files = [path / s for s in shards]
    else:
        files = [path / "model.safetensors"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CorruptModelError(
            f"{path} has no weights: missing {', '.join(missing)} "
            "(graftlm reads safetensors; convert .bin checkpoints with transformers first)"
        )
    return files


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield key, st.get_tensor(key)
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:
            raise CorruptModelError(f"cannot read weights from {f}: {e}") from e


def build_model(
    config: LlamaConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    prepare: Callable[[Llama], None] | None = None,
) -> Llama:
    """A `Llama` whose parameters are exactly `tensors` (HF key names), checked for missing and misfit keys.

    prepare: changes the empty (meta) model first, e.g. swaps in palettized layers whose buffers the
    tensors then fill; buffers keep their own dtype, parameters take `dtype`.
    """
    with torch.device("meta"):
        model = Llama(config)
        if prepare is not None:
            prepare(model)
    tied = config.tie_word_embeddings
    expected = {k: p for k, p in model.state_dict().items() if not (tied and k.startswith("lm_head."))}
    params = {k for k, _ in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    for hf_key, t in tensors:
        key = hf_to_ours(hf_key)
        if key.endswith(IGNORED_SUFFIXES) or (tied and key.startswith("lm_head.")):
            continue
        if key not in expected:
            raise CorruptModelError(f"unexpected tensor {hf_key!r} for a {config.model_type} model")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CorruptModelError(
                f"tensor {hf_key!r} has shape {tuple(t.shape)}, the config implies {tuple(expected[key].shape)}"
            )
        state[key] = t.to(device=device, dtype=dtype if key in params else expected[key].dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(ours_to_hf(k) for k in missing[:5])
        raise CorruptModelError(f"checkpoint is missing {len(missing)} tensors: {shown}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_head()
    model.rotary.to(device)
    return model.eval()


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face key names (tied lm_head left out)."""
    tied = model.config.tie_word_embeddings
    return {ours_to_hf(k): v for k, v in model.state_dict().items() if not (tied and k.startswith("lm_head."))}


def read_checkpoint(
    path: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    prepare: Callable[[Llama], None] | None = None,
) -> tuple[Llama, Tokenizer]:
    """Read a Hugging Face Llama-family checkpoint directory (see `build_model` for `prepare`; checkpoints
    whose layers need swapping, such as palettized ones, are loaded by `graftlm.loading.checkpoint`)."""
    if not (path / "config.json").exists():
        raise CorruptModelError(f"{path} is not a checkpoint directory: it has no config.json")
    config = LlamaConfig.from_file(path / "config.json")
    model = build_model(config, read_tensors(path), dtype, device, prepare)
    tokenizer = Tokenizer.from_dir(path)
    log.debug("loaded %s: %d layers, %.1fM parameters", path, config.num_hidden_layers, model.num_parameters() / 1e6)
    return model, tokenizer


def save_checkpoint(
    path: Path,
    config: LlamaConfig,
    tensors: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write a checkpoint directory that both graftlm and transformers load, atomically.

    tensors: HF key names (see `hf_state_dict`).
    """
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        hf = {k: v.contiguous() for k, v in tensors.items()}
        if config.tie_word_embeddings:
            hf.pop("lm_head.weight", None)
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
