"""Adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Weights are stored in 16 bits (bf16 by default) and upcast to float32 on load. The base model's
fingerprint travels in the safetensors metadata, which PEFT, vLLM and LoRAX ignore.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import mmap
import os
import re
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from graftlm.fileio import atomic_dir
from graftlm.lora.config import TARGETS, AdapterError, LoraConfig
from graftlm.lora.files import CONFIG_FILE, FINGERPRINT_KEY, WEIGHTS_FILE
from graftlm.lora.layer import base_shape
from graftlm.lora.model import PEFT_PREFIX, add_lora, load_lora_state
from graftlm.model.llama import Llama
from graftlm.model.modules import module_path, projections

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_KEY = re.compile(
    rf"^{re.escape(PEFT_PREFIX)}model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)


@dataclass
class Adapter:
    config: LoraConfig
    tensors: dict[str, torch.Tensor]  # PEFT key -> float32 tensor
    base_fingerprint: str | None
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.path else "<in memory>"

    def modules(self) -> set[str]:
        return {k.removeprefix(PEFT_PREFIX).rpartition(".lora_")[0] for k in self.tensors}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def save_adapter(
    path: Path,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    base_fingerprint: str,
    dtype: str = "bfloat16",
    base_model: str = "",
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write an adapter folder atomically (a failed write leaves any previous version in place).

    extra_files: more text files for the folder (the training record), written in the same swap.
    """
    if dtype not in STORAGE_DTYPES:
        raise AdapterError(f"adapter storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    stored = {k: v.detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_peft(base_model), indent=2))
        save_file(stored, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", FINGERPRINT_KEY: base_fingerprint})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def read_adapter(path: Path, dtype: torch.dtype | None = torch.float32) -> Adapter:
    """Read and check an adapter folder's own consistency (fit to a base is `check_fits`).

    dtype: what to convert the weights to; None keeps the stored 16 bits.
    """
    with open_adapter(path) as lazy:  # copy out of the mapped file before it closes
        tensors = {k: t.to(dtype) if dtype not in (None, t.dtype) else t.clone() for k, t in lazy.tensors.items()}
    return Adapter(lazy.config, tensors, lazy.base_fingerprint, path)


@contextmanager
def open_adapter(path: Path) -> Iterator[Adapter]:
    """An adapter whose tensors are views on the memory-mapped file (in their stored dtype), checked like
    `read_adapter`. The serving cache copies each straight into its slot: one copy, not two, and it
    overlaps the disk read of the rest of the file."""
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise AdapterError(f"adapter {path} is missing {f.name}", public=f"it has no {f.name}")
    config = _read_config(cfg_file, path)
    _read_ahead(weights_file)
    with open(weights_file, "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise AdapterError(f"adapter {path}: cannot read {WEIGHTS_FILE} (empty?): {e}", public=_CORRUPT) from e
    tensors: dict[str, torch.Tensor] = {}
    try:
        tensors, meta = _mapped_tensors(mapped, path)
        adapter = Adapter(config, tensors, meta.get(FINGERPRINT_KEY), path)
        _check_keys(adapter)
        yield adapter
    finally:
        del tensors  # views must go before the map can close
        with contextlib.suppress(BufferError):  # a caller still holds a view: the GC unmaps it later
            mapped.close()


_CORRUPT = f"its {WEIGHTS_FILE} is truncated or corrupt"
_NOT_FINITE = "its weights hold NaN or infinite values"
_LAYOUT = "its weights are not laid out as PEFT's LoRA tensors"
_SHAPES_DIFFER = "its shapes do not fit this base model"


def _read_config(cfg_file: Path, path: Path) -> LoraConfig:
    try:
        return LoraConfig.from_peft(json.loads(cfg_file.read_text()))
    except AdapterError as e:
        raise AdapterError(f"adapter {path}: {e}", public=f"its {CONFIG_FILE} holds settings not supported") from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, TypeError, ValueError, AttributeError) as e:
        raise AdapterError(
            f"adapter {path}: cannot read {CONFIG_FILE}: {e}", public=f"its {CONFIG_FILE} is not a LoRA config"
        ) from e


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# the views on a read-only map are only ever read; torch warns about every one of them otherwise
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def _mapped_tensors(buf: mmap.mmap, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors file (8-byte little-endian header length, JSON header, data) into views,
    checking what safetensors checks: the header, dtypes, and that every tensor lies inside the file."""

    def bad(why: str) -> AdapterError:
        return AdapterError(f"adapter {path}: cannot read {WEIGHTS_FILE} (truncated or corrupt?): {why}", _CORRUPT)

    if len(buf) < 8:
        raise bad("shorter than its header")
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8:
        raise bad(f"header of {n} bytes in a {len(buf)}-byte file")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise bad(f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data = 8 + n
    tensors = {}
    for key, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"tensor {key!r}: {e}") from e
        if any(d < 0 for d in shape):
            raise bad(f"tensor {key!r} has a negative dimension")
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or begin < 0 or data + end > len(buf):
            raise bad(f"tensor {key!r} does not fit the file")
        t = (
            torch.frombuffer(buf, dtype=dtype, count=count, offset=data + begin)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors[key] = t.view(shape)
    _check_finite(buf, data, header, path)
    return tensors, meta


# the exponent bits of each float format: all set means NaN or infinity
_EXPONENT = {
    torch.float32: (np.uint32, 0x7F800000),
    torch.bfloat16: (np.uint16, 0x7F80),
    torch.float16: (np.uint16, 0x7C00),
}


def _check_finite(buf: mmap.mmap, data: int, header: dict, path: Path) -> None:
    """Refuse NaN or infinite weights: one such row would poison every prompt packed beside it.

    The test reads the exponent bits with numpy, on the loader thread: a torch reduction there runs on a
    second OpenMP pool, after which the engine thread's pool stops spin-waiting and every later step is
    slower (serving 22% slower; benchmarks/README.md, "Engine thread and malloc"). The usual file (one
    dtype, tensors end to end) is checked as one span."""
    spans = sorted((int(i["data_offsets"][0]), int(i["data_offsets"][1]), _DTYPES[i["dtype"]]) for i in header.values())
    if len({d for *_, d in spans}) == 1 and all(a[1] == b[0] for a, b in itertools.pairwise(spans)):
        spans = [(spans[0][0], spans[-1][1], spans[0][2])] if spans else []
    for begin, end, dtype in spans:
        kind, mask = _EXPONENT[dtype]
        bits = np.frombuffer(buf, dtype=kind, count=(end - begin) // dtype.itemsize, offset=data + begin)
        if bits.size and bool(np.any((bits & kind(mask)) == kind(mask))):
            raise AdapterError(f"adapter {path}: {WEIGHTS_FILE} holds NaN or infinite values", _NOT_FINITE)


def _read_ahead(path: Path) -> None:
    """Ask the kernel to read the whole file now: a mapped file faults its pages in one small readahead
    window at a time, several times slower for a cold adapter (benchmarks/README.md, "Adapter read-ahead")."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError), open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)


def _check_keys(adapter: Adapter) -> None:
    if not adapter.tensors:
        raise AdapterError(f"adapter {adapter.name} has no weights", _LAYOUT)
    kinds: dict[str, set[str]] = {}
    for key in adapter.tensors:
        m = _KEY.match(key)
        if m is None or m.group(3) not in TARGETS:
            raise AdapterError(f"adapter {adapter.name}: unexpected tensor {key!r}", _LAYOUT)
        kinds.setdefault(module_path(int(m.group(1)), m.group(3)), set()).add(m.group(4))
    for path, have in kinds.items():
        if not {"lora_A.weight", "lora_B.weight"} <= have:
            raise AdapterError(f"adapter {adapter.name}: {path} lacks lora_A or lora_B", _LAYOUT)
        if adapter.config.use_dora != ("lora_magnitude_vector" in have):
            raise AdapterError(f"adapter {adapter.name}: {path} DoRA magnitude does not match use_dora", _LAYOUT)


def check_fits(adapter: Adapter, model: Llama, force: bool = False) -> None:
    """Refuse an adapter trained on another base model, or whose shapes do not fit this one."""
    if adapter.base_fingerprint is None:
        log.warning("adapter %s does not record its base model; assuming it fits", adapter.name)
    elif adapter.base_fingerprint != model.fingerprint():
        msg = (
            f"adapter {adapter.name} was trained on base model {adapter.base_fingerprint[:12]}, "
            f"not on this one ({model.fingerprint()[:12]})"
        )
        if not force:
            raise AdapterError(msg + "; pass force to load it anyway", "it was trained on another base model")
        log.warning("%s; loading anyway (forced)", msg)
    c = model.config
    shapes = _proj_shapes(model)
    for key, t in adapter.tensors.items():
        m = _KEY.match(key)
        assert m is not None  # checked by read_adapter
        layer, target, kind = int(m.group(1)), m.group(3), m.group(4)
        if layer >= c.num_hidden_layers:
            raise AdapterError(
                f"adapter {adapter.name}: {key} is for layer {layer}, the base has {c.num_hidden_layers} layers",
                _SHAPES_DIFFER,
            )
        path = module_path(layer, target)
        out_f, in_f = shapes[path]
        r, _ = adapter.config.rank_alpha(path)
        want = {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r), "lora_magnitude_vector": (out_f,)}[kind]
        if tuple(t.shape) != want:
            raise AdapterError(
                f"adapter {adapter.name}: {key} has shape {tuple(t.shape)}, this base needs {want}", _SHAPES_DIFFER
            )


_SHAPES: weakref.WeakKeyDictionary[Llama, dict[str, tuple[int, int]]] = weakref.WeakKeyDictionary()


def _proj_shapes(model: Llama) -> dict[str, tuple[int, int]]:
    """[out, in] of every projection by module path (computed once per model: cold loads check often)."""
    if model not in _SHAPES:
        _SHAPES[model] = {module_path(i, t): base_shape(getattr(p, "base", p)) for i, t, p in projections(model)}
    return _SHAPES[model]


def apply_adapter(model: Llama, adapter: Adapter, force: bool = False) -> None:
    """Attach `adapter` to the model as LoRA layers (for training on, merging, or single-adapter use)."""
    check_fits(adapter, model, force)
    add_lora(model, adapter.config, only=adapter.modules())
    load_lora_state(model, adapter.tensors)
