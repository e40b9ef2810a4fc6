"""Small C kernels compiled on first use with the system compiler and loaded through ctypes.

Each kernel is built once per source, flags and compiler version into graftlm's cache
(`kernels/NAME-HASH.so`). Without a compiler, after a failed build, or with GRAFTLM_KERNEL=never,
`compile_library` returns None and callers use their PyTorch path. Where a kernel is not faster
everywhere, `FasterPath` times it against the PyTorch path on this host and keeps the faster one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

from graftlm.errors import ConfigError
from graftlm.paths import cache_root

log = logging.getLogger(__name__)
T = TypeVar("T")

# reassociation lets the compiler vectorize dot products (sums then differ from a sequential loop in the
# last bits only)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
CFLAGS += ["-shared", "-fPIC", "-std=c11"]


def compile_library(name: str, source: str) -> ctypes.CDLL | None:
    """The shared library built from `source` (cached), or None when no kernel can be had."""
    if kernel_setting() is False:
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        log.warning("no C compiler found: the %s kernel is replaced by a slower PyTorch path", name)
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256((source + " ".join(CFLAGS) + version).encode()).hexdigest()[:16]
    lib = cache_root() / "kernels" / f"{name}-{key}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
            src.write_text(source)
            done = subprocess.run([cc, *CFLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                log.warning("compiling the %s kernel failed; using the PyTorch path:\n%s", name, done.stderr[-2000:])
                return None
            os.replace(out, lib)
    return ctypes.CDLL(str(lib))


def kernel_setting() -> bool | None:
    """GRAFTLM_KERNEL, the one switch for every kernel: True (`always` the kernel where one was built),
    False (`never`: none is even compiled) or None (`auto`, the default: time both paths where it matters)."""
    force = os.environ.get("GRAFTLM_KERNEL", "auto")
    if force not in ("auto", "always", "never"):
        raise ConfigError(f"GRAFTLM_KERNEL must be auto, always or never, not {force!r}")
    return None if force == "auto" else force == "always"


class FasterPath:
    """Per key (a product's shape), whether a kernel or the PyTorch path computes it faster on this host.

    Which one wins depends on the host more than on the code, and on one host the winner changes with the
    number of rows and the weight's shape (benchmarks/README.md, "Kernel or PyTorch, per shape"). So the
    first `trials` calls of each key alternate between the two paths and are timed where they run, on the
    real operands with whatever the surrounding work left in the caches; from then on the key takes the
    path with the lower median time. A decode step calls each projection shape once per layer, so the
    choice is made within the first step or two. GRAFTLM_KERNEL=always or never skips the timing; it is
    read at the first call, so that a bad value is an error of the command that runs, not of an import.
    """

    def __init__(self, name: str, trials: int = 8) -> None:
        self.name, self.trials = name, trials
        self.chosen: dict[Hashable, bool] = {}  # key -> the kernel is faster
        self.times: dict[Hashable, tuple[list[int], list[int]]] = {}  # key -> (kernel ns, PyTorch ns) so far

    @functools.cached_property
    def force(self) -> bool | None:
        """GRAFTLM_KERNEL, read once at the first call (None: time both paths); assigning it overrides it."""
        return kernel_setting()

    def __call__(self, key: Hashable, kernel: Callable[..., T], reference: Callable[..., T], *args: object) -> T:
        use = self.force if self.force is not None else self.chosen.get(key)
        if use is not None:
            return kernel(*args) if use else reference(*args)
        k, t = self.times.setdefault(key, ([], []))
        use = len(k) <= len(t)
        start = time.perf_counter_ns()
        out = kernel(*args) if use else reference(*args)
        (k if use else t).append(time.perf_counter_ns() - start)
        if len(t) >= self.trials:
            self.chosen[key] = faster = statistics.median(k) <= statistics.median(t)
            del self.times[key]
            log.debug("%s %s: the %s path is faster", self.name, key, "kernel" if faster else "PyTorch")
        return out


# glibc mallopt parameters (malloc.h) and the largest mmap threshold glibc accepts on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# larger blocks are mapped and unmapped on their own: kept in the heap, they fragment it (benchmarks/README.md)
HEAP_BLOCK_MAX = 16 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 16 MiB in the heap instead of returning them.

    A training step allocates and frees the same activation-sized buffers every time. By default glibc
    gives large freed blocks back to the system, so each step's allocations are fresh pages the kernel
    faults in and zeroes one by one (benchmarks/README.md, "Engine thread and malloc" has the cost).
    Memory freed this way stays in the process, which is what a training process wants. Larger blocks
    (a long batch's activations) are mapped for each use and returned when freed: kept in the heap beside
    the activations saved for the backward pass, they fragment it, and a batch of 8 x 1024 tokens then
    peaked at 8.6 GB instead of 2.4 (benchmarks/README.md, "Engine thread and malloc"). False off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_MAX) == 1
    return ok and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


# Dot products shared by the kernels: C source that goes before theirs (`compile_library(name, DOT + SOURCE)`).
DOT = r"""
#include <stdint.h>

/* One row: 32 partial sums (kept in four vector registers) give independent FMA chains. */
static inline float dot(const float *w, const float *x, int64_t n) {
    float a[32] = {0}, s = 0.f;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) for (int l = 0; l < 32; l++) a[l] += w[i + l] * x[i + l];
    for (int l = 0; l < 32; l++) s += a[l];
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

#ifdef __AVX2__
#include <immintrin.h>
/* out[r] = w . x[r] for r < nr <= 4, x rows `ld` apart: each loaded piece of w serves every row. */
static inline void dot_rows(const float *w, const float *x, int64_t ld, int64_t n, int nr, float *out) {
    if (nr == 1) {
        out[0] = dot(w, x, n);
        return;
    }
    __m256 a0[4], a1[4];
    for (int r = 0; r < 4; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
        for (int r = 0; r < nr; r++) {
            a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * ld + i), a0[r]);
            a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * ld + i + 8), a1[r]);
        }
    }
    for (int r = 0; r < nr; r++) {
        float v[8], s = 0.f;
        _mm256_storeu_ps(v, _mm256_add_ps(a0[r], a1[r]));
        for (int l = 0; l < 8; l++) s += v[l];
        for (int64_t j = i; j < n; j++) s += w[j] * x[r * ld + j];
        out[r] = s;
    }
}
#else
static inline void dot_rows(const float *w, const float *x, int64_t ld, int64_t n, int nr, float *out) {
    for (int r = 0; r < nr; r++) out[r] = dot(w, x + r * ld, n);
}
#endif

/* Output column o of every input row: y[r, o] = s * (w . x[r]) + b for r < n_x, four rows at a time.
   w [n] one weight row; x [n_x, n]; y [n_x, out_f]. */
static inline void row_products(const float *w, const float *x, int64_t n_x, int64_t n, float s, float b, float *y,
                                int64_t out_f, int64_t o) {
    float d[4];
    for (int64_t r0 = 0; r0 < n_x; r0 += 4) {
        const int nr = n_x - r0 < 4 ? (int)(n_x - r0) : 4;
        dot_rows(w, x + r0 * n, n, n, nr, d);
        for (int r = 0; r < nr; r++) y[(r0 + r) * out_f + o] = s * d[r] + b;
    }
}
"""
