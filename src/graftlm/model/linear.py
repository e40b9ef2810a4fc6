"""The model's dense projection: `nn.Linear`, with a streaming kernel for the few-row products of decoding.

A decode step multiplies each weight by one activation row per sequence. That product reads the whole
weight once and does two flops per float read, so it runs at the speed memory streams, and PyTorch's
BLAS matrix-vector product does not always stream at it (figures: benchmarks/README.md, "Decode kernel
rows"). `gemv` reads each weight row once, with every input row dotted against it while it sits in
cache, split over the threads by output row. Products of more rows (prefill, training) and anything that
needs a gradient stay with `F.linear`. On some hosts PyTorch's product is the faster one, for some shapes
or for all: each product shape takes whichever path `FasterPath` timed faster in its first calls.
Compiled on first use (`graftlm.native`); without a compiler `F.linear` is used throughout.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.native import DOT, FasterPath, compile_library

# The kernel reads each weight row once and dots it with every input row while it sits in cache, four input
# rows at a time. Beyond this many rows the product does enough work per weight read for BLAS to win
# (benchmarks/README.md, "Decode kernel rows").
MAX_ROWS = 8
# The faster of the kernel and F.linear, per (rows, out, in, threads): no fixed rule fits every host
# (benchmarks/README.md, "Kernel or PyTorch, per shape").
paths = FasterPath("gemv")

SOURCE = r"""
/* A tile of the product: out[j * 4 + r] = w[j] . x[r] for TILE_W weight rows and 4 input rows, each `ld`
   floats apart. Every loaded piece of weight serves four rows and every loaded piece of input TILE_W
   weight rows, so several rows (a speculative step's verification) cost about what their arithmetic
   costs, not a load per multiply-add. 512-bit vectors and 4 x 4 accumulators where the CPU has them
   (32 vector registers), else 256-bit and 2 x 4. */
#if defined(__AVX512F__)
#define TILE_W 4
#define TILE_LANES 16
typedef __m512 tile_vec;
#define tile_zero _mm512_setzero_ps
#define tile_load _mm512_loadu_ps
#define tile_fma _mm512_fmadd_ps
static inline float tile_sum(tile_vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
#define TILE_W 2
#define TILE_LANES 8
typedef __m256 tile_vec;
#define tile_zero _mm256_setzero_ps
#define tile_load _mm256_loadu_ps
#define tile_fma _mm256_fmadd_ps
static inline float tile_sum(tile_vec v) {
    float l[8], s = 0.f;
    _mm256_storeu_ps(l, v);
    for (int i = 0; i < 8; i++) s += l[i];
    return s;
}
#endif

#ifdef TILE_LANES
static inline void dot_tile(const float *w, const float *x, int64_t ld, int64_t n, float *out) {
    tile_vec acc[TILE_W][4];
    for (int j = 0; j < TILE_W; j++)
        for (int r = 0; r < 4; r++) acc[j][r] = tile_zero();
    int64_t i = 0;
    for (; i + TILE_LANES <= n; i += TILE_LANES) {
        const tile_vec x0 = tile_load(x + i), x1 = tile_load(x + ld + i);
        const tile_vec x2 = tile_load(x + 2 * ld + i), x3 = tile_load(x + 3 * ld + i);
        for (int j = 0; j < TILE_W; j++) {
            const tile_vec wj = tile_load(w + j * ld + i);
            acc[j][0] = tile_fma(wj, x0, acc[j][0]);
            acc[j][1] = tile_fma(wj, x1, acc[j][1]);
            acc[j][2] = tile_fma(wj, x2, acc[j][2]);
            acc[j][3] = tile_fma(wj, x3, acc[j][3]);
        }
    }
    for (int j = 0; j < TILE_W; j++)
        for (int r = 0; r < 4; r++) {
            float s = tile_sum(acc[j][r]);
            for (int64_t t = i; t < n; t++) s += w[j * ld + t] * x[r * ld + t];
            out[j * 4 + r] = s;
        }
}
#else
#define TILE_W 1
static inline void dot_tile(const float *w, const float *x, int64_t ld, int64_t n, float *out) {
    dot_rows(w, x, ld, n, 4, out);
}
#endif

/* y[r, o] = x[r, :] . w[o, :] (+ bias[o]) for r < n_x. x [n_x, in_f], w [out_f, in_f], y [n_x, out_f].
   One input row: each weight row streams from memory once (`dot`). Several: tiles of TILE_W weight rows
   by four input rows, then the rows left over four at a time per weight row (`row_products`). */
void gemv(const float *x, const float *w, const float *bias, float *y, int64_t n_x, int64_t in_f, int64_t out_f,
          int n_threads) {
    const int64_t tiles = n_x >= 4 ? out_f / TILE_W : 0, full = n_x / 4 * 4;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t o = t * TILE_W;
        float d[TILE_W * 4];
        for (int64_t r0 = 0; r0 < full; r0 += 4) {
            dot_tile(w + o * in_f, x + r0 * in_f, in_f, in_f, d);
            for (int j = 0; j < TILE_W; j++)
                for (int r = 0; r < 4; r++) y[(r0 + r) * out_f + o + j] = d[j * 4 + r] + (bias ? bias[o + j] : 0.f);
        }
        if (full < n_x)
            for (int j = 0; j < TILE_W; j++)
                row_products(w + (o + j) * in_f, x + full * in_f, n_x - full, in_f, 1.f, bias ? bias[o + j] : 0.f,
                             y + full * out_f, out_f, o + j);
    }
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t o = tiles * TILE_W; o < out_f; o++)
        row_products(w + o * in_f, x, n_x, in_f, 1.f, bias ? bias[o] : 0.f, y, out_f, o);
}
"""


@cache
def kernel() -> ctypes.CDLL | None:
    """The compiled library, or None (no compiler, failed build, or GRAFTLM_KERNEL=never)."""
    dll = compile_library("gemv", DOT + SOURCE)
    if dll is None:
        return None
    dll.gemv.restype = None
    dll.gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]  # x w bias y n in out threads
    return dll


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in] @ weightᵀ (+ bias) -> [N, out], all float32, contiguous, on the CPU (see `linear`)."""
    dll = kernel()
    assert dll is not None, "gemv kernel not available"
    n, in_f = x.shape
    out_f = weight.shape[0]
    y = torch.empty(n, out_f, dtype=torch.float32)
    dll.gemv(
        x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
        n, in_f, out_f, torch.get_num_threads(),
    )  # fmt: skip
    return y


def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return x.numel() <= MAX_ROWS * x.shape[-1] and kernel() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through `gemv` for up to `MAX_ROWS` input rows, float32 on the CPU, when nothing needs a
    gradient and `paths` found the kernel faster for this shape."""
    if not _fits(x, weight, bias):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    key = (x2.shape[0], *weight.shape, torch.get_num_threads())
    return paths(key, gemv, F.linear, x2, weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
