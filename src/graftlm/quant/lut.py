"""Lookup-table kernels for palettized weights on the CPU: dequantize rows, and a fused matmul.

`lut_matmul` decodes one output row at a time into a small buffer (it stays in L1) and takes its dot
products with every input row (four at a time, `native.DOT`), so a decode step reads the packed indices
(2-8 bits per weight) instead of a float32 weight (32 bits). For many input rows the caller dequantizes
whole weights once and uses the BLAS matmul instead (`FUSED_MAX_ROWS`). Compiled on first use
(`graftlm.native`); without a compiler the PyTorch reference (`Palette.dense`) is used.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from graftlm.native import DOT, compile_library

# above this many input rows, dequantizing the weight and calling the BLAS matmul may be faster
# (benchmarks/README.md, "Palettized products")
FUSED_MAX_ROWS = 16

SOURCE = r"""
#include <stdlib.h>

/* Row r of packed indices is a little-endian bit stream: index j holds bits [j*B, (j+1)*B). */
static inline uint32_t index_at(const uint8_t *p, int64_t j, int B) {
    const int64_t bit = j * B, byte = bit >> 3, sh = bit & 7;
    uint32_t v = p[byte];
    if (sh + B > 8) v |= (uint32_t)p[byte + 1] << 8;
    return (v >> sh) & ((1u << B) - 1);
}

#ifdef __AVX2__
#include <immintrin.h>
/* Eight indices at a time: their bits spread over eight 32-bit lanes, then one table permute (tables of
   up to 8 entries), two permutes and a blend (16 entries) or a gather (64 and 256 entries). */
static inline __m256i lanes(uint32_t word, int B) {
    const __m256i shift = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(B));
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), shift), _mm256_set1_epi32((1 << B) - 1));
}
static inline uint32_t load_le(const uint8_t *p, int n) {
    uint32_t v = 0;
    for (int i = 0; i < n; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}
#define DECODE(B)                                                                                   \
static void decode_##B(const uint8_t *p, const float *t, float *out, int64_t n) {                  \
    int64_t j = 0;                                                                                  \
    if (B <= 3) {                                                                                   \
        float tb[8] = {0}; for (int c = 0; c < (1 << B); c++) tb[c] = t[c];                         \
        const __m256 tv = _mm256_loadu_ps(tb);                                                      \
        for (; j + 8 <= n; j += 8)                                                                  \
            _mm256_storeu_ps(out + j, _mm256_permutevar8x32_ps(tv, lanes(load_le(p + j * B / 8, B), B))); \
    } else if (B == 4) {                                                                            \
        const __m256 lo = _mm256_loadu_ps(t), hi = _mm256_loadu_ps(t + 8);                         \
        for (; j + 8 <= n; j += 8) {                                                                \
            const __m256i ix = lanes(load_le(p + j / 2, 4), 4);                                     \
            const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(ix, 28));                      \
            _mm256_storeu_ps(out + j, _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, ix),            \
                                                       _mm256_permutevar8x32_ps(hi, ix), sel));     \
        }                                                                                           \
    } else if (B == 6) {                                                                            \
        for (; j + 8 <= n; j += 8) {                                                                \
            const uint8_t *q = p + j * 6 / 8;                                                       \
            const __m256i a = lanes(load_le(q, 3), 6), b = lanes(load_le(q + 3, 3), 6);             \
            const __m256i ix = _mm256_permute2x128_si256(a, b, 0x20);                               \
            _mm256_storeu_ps(out + j, _mm256_i32gather_ps(t, ix, 4));                               \
        }                                                                                           \
    } else {                                                                                        \
        for (; j + 8 <= n; j += 8) {                                                                \
            const __m256i ix = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + j)));     \
            _mm256_storeu_ps(out + j, _mm256_i32gather_ps(t, ix, 4));                               \
        }                                                                                           \
    }                                                                                               \
    for (; j < n; j++) out[j] = t[index_at(p, j, B)];                                               \
}
#else
#define DECODE(B)                                                                                   \
static void decode_##B(const uint8_t *p, const float *t, float *out, int64_t n) {                  \
    for (int64_t j = 0; j < n; j++) out[j] = t[index_at(p, j, B)];                                  \
}
#endif
DECODE(2)
DECODE(3)
DECODE(4)
DECODE(6)
DECODE(8)

typedef void (*decode_fn)(const uint8_t *, const float *, float *, int64_t);
static decode_fn decoder(int bits) {
    switch (bits) { case 2: return decode_2; case 3: return decode_3; case 4: return decode_4;
                    case 6: return decode_6; default: return decode_8; }
}

/* out[i, :] = scale[row_i] * tables[group(row_i)][indices of row_i], row_i = rows ? rows[i] : i.
   packed [out_f, row_bytes] uint8, tables [groups, 2^bits] float32, scales [out_f] float32 or NULL,
   out [n_rows, in_f] float32. */
void lut_dequant(const uint8_t *packed, const float *tables, const float *scales, const int64_t *rows, float *out,
                 int64_t n_rows, int64_t in_f, int64_t row_bytes, int bits, int64_t group_size, int n_threads) {
    const decode_fn dec = decoder(bits);
    const int64_t k = 1 << bits;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t i = 0; i < n_rows; i++) {
        const int64_t r = rows ? rows[i] : i, g = group_size ? r / group_size : 0;
        float *o = out + i * in_f;
        dec(packed + r * row_bytes, tables + g * k, o, in_f);
        if (scales) for (int64_t j = 0; j < in_f; j++) o[j] *= scales[r];
    }
}

/* y[n, o] = x[n, :] . W[o, :] for n < n_x (y is overwritten). x [n_x, in_f], y [n_x, out_f] float32. */
void lut_matmul(const float *x, const uint8_t *packed, const float *tables, const float *scales, float *y, int64_t n_x,
                int64_t in_f, int64_t out_f, int64_t row_bytes, int bits, int64_t group_size, int n_threads) {
    const decode_fn dec = decoder(bits);
    const int64_t k = 1 << bits;
    #pragma omp parallel num_threads(n_threads)
    {
        float *w = malloc(sizeof(float) * in_f);
        #pragma omp for schedule(static)
        for (int64_t o = 0; o < out_f; o++) {
            const int64_t g = group_size ? o / group_size : 0;
            dec(packed + o * row_bytes, tables + g * k, w, in_f);
            row_products(w, x, n_x, in_f, scales ? scales[o] : 1.f, 0.f, y, out_f, o);
        }
        free(w);
    }
}
"""


@cache
def kernel() -> ctypes.CDLL | None:
    """The compiled LUT library, or None (no compiler, failed build, or GRAFTLM_KERNEL=never)."""
    dll = compile_library("lut", DOT + SOURCE)
    if dll is None:
        return None
    tail = [ctypes.c_int, ctypes.c_int64, ctypes.c_int]  # bits, group_size, n_threads
    dll.lut_dequant.restype = dll.lut_matmul.restype = None
    dll.lut_dequant.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + tail  # packed tables scales rows out
    dll.lut_matmul.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + tail  # x packed tables scales y
    return dll


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors (compiled, all contiguous on the CPU)."""
    return kernel() is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def dequant(
    packed: torch.Tensor,
    tables: torch.Tensor,
    scales: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_f: int,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """[len(rows) or out, in_f] float32: the dequantized rows (all of them without `rows`).

    packed [out, row_bytes] uint8; tables [groups, 2^bits] float32; scales [out] float32 or None; rows int64.
    """
    dll = kernel()
    assert dll is not None, "lut kernel not available"
    n = packed.shape[0] if rows is None else rows.numel()
    out = torch.empty(n, in_f, dtype=torch.float32)
    rows = None if rows is None else rows.reshape(-1).to(torch.int64).contiguous()
    dll.lut_dequant(
        packed.data_ptr(), tables.data_ptr(), _ptr(scales), _ptr(rows), out.data_ptr(),
        n, in_f, packed.shape[1], bits, group_size, torch.get_num_threads(),
    )  # fmt: skip
    return out


def matmul(
    x: torch.Tensor, packed: torch.Tensor, tables: torch.Tensor, scales: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """x [N, in] float32 @ Wᵀ -> [N, out] float32, W given by packed indices, float32 tables and row scales."""
    dll = kernel()
    assert dll is not None, "lut kernel not available"
    n, in_f = x.shape
    out_f = packed.shape[0]
    y = torch.empty(n, out_f, dtype=torch.float32)
    dll.lut_matmul(
        x.data_ptr(), packed.data_ptr(), tables.data_ptr(), _ptr(scales), y.data_ptr(),
        n, in_f, out_f, packed.shape[1], bits, group_size, torch.get_num_threads(),
    )  # fmt: skip
    return y
