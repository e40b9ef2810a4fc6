"""llama.cpp as a peer of `palettize.py`: its own quantizer makes its types from the same GGUF file, and
they are scored on the same held-out tokens (llama-cpp-python, optional: `pip install -e '.[bench]'`,
which compiles llama.cpp).

The source GGUF of the default model is Q4_1; llama.cpp requantizes it (dequantizes each tensor to float32,
then quantizes), so both tools start from the same "uncompressed" weights. Its K- and I-quants work on
super-blocks of 256 inputs: on SmolLM2-135M's 576-wide rows it falls back to a 32-block type (Q4_0 for
Q3_K, Q5_0 for Q4_K, Q8_0 for the Q6_K its rules give the tied embedding), so only the 1536-wide down
projections get the type asked for (Q2_K comes out as Q3_K_S does). No importance matrix is used: the
Python binding has no way to make one. Its F32 row checks that both tools see the same tokens: it must
score what graftlm's float32 model scores.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# llama.cpp's types with its own per-tensor rules (which put the tied embedding at Q8_0 here), the same
# types on every tensor ("pure", as graftlm's uniform widths are), and F32 for the parity check
TYPES = ("F32", "Q4_0", "IQ4_NL", "Q3_K_M", "Q3_K_S", "Q4_0 pure", "IQ4_NL pure", "Q3_K_S pure")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def label(kind: str) -> str:
    return f"llama.cpp {kind}"


def quantize(source: Path, kind: str, work: Path, threads: int) -> Path:
    """`source` quantized by llama.cpp to `kind` (cached under `work`; rebuilt when the source is newer)."""
    import llama_cpp

    out = work / f"llama.cpp-{kind.replace(' ', '-')}.gguf"
    if out.exists() and out.stat().st_mtime > source.stat().st_mtime:
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    name, _, pure = kind.partition(" ")
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}")
    params.pure = pure == "pure"
    params.allow_requantize = True  # the source is already quantized (Q4_1)
    params.nthread = threads
    work.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
    tmp.replace(out)
    return out


def bits_per_weight(path: Path) -> float:
    """Every tensor's stored bits (blocks with their scales, the float32 norms) over its weights."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def measure(path: Path, chunks: Sequence[Sequence[int]], prompt: Sequence[int], threads: int) -> dict[str, float]:
    """Perplexity on `chunks` (each scored on its own, as `graftlm.eval.perplexity` scores them) and decode
    speed at batch 1 (64 greedy tokens after `prompt`, prefill included, as `palettize.measure` times it)."""
    from llama_cpp import Llama

    ctx = max(512, max(len(c) for c in chunks), len(prompt) + 64)
    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=threads, verbose=False)
    total, count = 0.0, 0
    for seq in chunks:
        llm.reset()
        llm.eval(list(seq))
        logits = np.asarray(llm.scores[: len(seq) - 1], dtype=np.float64)  # [n-1, V]
        top = logits.max(1)
        logz = top + np.log(np.exp(logits - top[:, None]).sum(1))
        total += float((logz - logits[np.arange(len(seq) - 1), list(seq[1:])]).sum())
        count += len(seq) - 1
    out = {"ppl": math.exp(total / count), "bpw": bits_per_weight(path), "size_mib": path.stat().st_size / 2**20}
    llm.reset()
    stream = llm.generate(list(prompt), temp=0.0, top_k=1, repeat_penalty=1.0)
    next(stream)  # warm-up: the prompt and one token
    llm.reset()
    t0 = time.perf_counter()
    stream = llm.generate(list(prompt), temp=0.0, top_k=1, repeat_penalty=1.0)
    for n, _ in enumerate(stream, 1):
        if n == 64:
            break
    out["decode_tok_s"] = 64 / (time.perf_counter() - t0)
    return out
