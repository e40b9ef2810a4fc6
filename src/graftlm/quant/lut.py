"""Lookup-table kernels for palettized weights on the CPU: dequantize rows, and a fused matmul.

`lut_matmul` decodes one output row at a time into a small buffer (it stays in L1) and takes its dot
products with every input row (four at a time, `native.DOT`), so a decode step reads the packed indices
(2-8 bits per weight) instead of a float32 weight (32 bits). For many input rows the caller dequantizes
whole weights once and uses the BLAS matmul instead (`FUSED_MAX_ROWS`). Compiled on first use
(`graftlm.native`); without a compiler the PyTorch reference (`Palette.dense`) is used.

`Q8Linear` is the faster product that decoding uses where the CPU has AVX2 and BMI2: int8 copies of the
tables, activations quantized to 8 bits per block of 32, integer dot products of 32 weights at a time
(about 0.7% relative error per product, as llama.cpp's quantized types; 2.5-3.5x the float kernel here:
benchmarks/README.md, "Compressed models"). With AVX-512 VBMI the indices are cut out by one multishift
and 64-entry tables are one permute.
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

/* ---- integer products: 8-bit tables, activations quantized to 8 bits per block of 32 ----
   Each weight's table (2^bits entries per group of output rows) is held as int8 with one float scale,
   each input row as int8 with one scale per 32 values. A block of 32 weights is then 32 indices turned
   into bytes (one pdep per 8 indices), a byte shuffle through the table (four shuffles and three blends
   for 64 entries), and an integer dot product with the block's 32 activations (maddubs), so the inner
   loop works on 32 weights per instruction where the float path decodes 8. llama.cpp's IQ4_NL does the
   same with one fixed 16-entry table. */
#if defined(__AVX2__) && defined(__BMI2__)
#include <string.h>
#define Q8_BLOCK 32

int q8_available(void) { return 1; }

#if defined(__AVX512VBMI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
/* The 32 indices of B bits at p (4·B bytes) as 32 bytes: a masked load of the 4·B bytes, a byte permute
   that gives each 64-bit lane the bytes of its 8 indices, one multishift that cuts them out. */
static inline __m256i indices32(const uint8_t *p, const int B, const int last) {
    const __m256i raw = last ? _mm256_maskz_loadu_epi8((__mmask32)((1ull << (4 * B)) - 1), p)
                             : _mm256_loadu_si256((const __m256i *)p);
    const __m256i spread = _mm256_setr_epi8(
        0, 1, 2, 3, 4, 5, 6, 7, B, B + 1, B + 2, B + 3, B + 4, B + 5, B + 6, B + 7,
        2 * B, 2 * B + 1, 2 * B + 2, 2 * B + 3, 2 * B + 4, 2 * B + 5, 2 * B + 6, 2 * B + 7,
        3 * B, 3 * B + 1, 3 * B + 2, 3 * B + 3, 3 * B + 4, 3 * B + 5, 3 * B + 6, 3 * B + 7);
    const __m256i shifts = _mm256_set1_epi64x((long long)(0x0706050403020100ull * B));
    const __m256i ix = _mm256_multishift_epi64_epi8(shifts, _mm256_permutexvar_epi8(spread, raw));
    return _mm256_and_si256(ix, _mm256_set1_epi8((char)((1 << B) - 1)));
}
#else
/* The 32 indices of B bits at p (4·B bytes) as 32 bytes. `last`: p ends its buffer, so read exactly 4·B
   bytes; otherwise each group of 8 indices is one 8-byte load that may read into the next block. */
static inline __m256i indices32(const uint8_t *p, const int B, const int last) {
    const uint64_t mask = B == 2 ? 0x0303030303030303ull : B == 3 ? 0x0707070707070707ull
                        : B == 4 ? 0x0F0F0F0F0F0F0F0Full : 0x3F3F3F3F3F3F3F3Full;
    const uint64_t keep = (1ull << (8 * B)) - 1;
    uint64_t v[4];
    for (int k = 0; k < 4; k++) {
        uint64_t w = 0;
        if (last) memcpy(&w, p + k * B, B); else memcpy(&w, p + k * B, 8);
        v[k] = _pdep_u64(w & keep, mask);
    }
    return _mm256_set_epi64x((long long)v[3], (long long)v[2], (long long)v[1], (long long)v[0]);
}
#endif

static inline __m256i lookup(const __m256i ix, const __m256i *t, const int B) {
    if (B <= 4) return _mm256_shuffle_epi8(t[0], ix);
#if defined(__AVX512VBMI__) && defined(__AVX512VL__)
    return _mm256_permutex2var_epi8(t[0], ix, t[1]);  /* t[0], t[1]: entries 0-31, 32-63 */
#endif
    const __m256i s3 = _mm256_slli_epi16(ix, 3), s2 = _mm256_slli_epi16(ix, 2);  /* bit 4, bit 5 -> bit 7 */
    const __m256i a = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[0], ix), _mm256_shuffle_epi8(t[1], ix), s3);
    const __m256i b = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[2], ix), _mm256_shuffle_epi8(t[3], ix), s3);
    return _mm256_blendv_epi8(a, b, s2);
}

/* One table's int8 entries as lookup() takes them: 16 entries in both 128-bit halves (pshufb looks up
   within each half), or for 64 entries two registers of 32 (VBMI) or four of 16 (AVX2). */
static inline void tables_of(const int8_t *q, const int B, __m256i *t) {
    if (B <= 4) {  /* tables of fewer entries are padded to 16 in memory: one load, no byte stores first */
        t[0] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q));
        return;
    }
#if defined(__AVX512VBMI__) && defined(__AVX512VL__)
    t[0] = _mm256_loadu_si256((const __m256i *)q);
    t[1] = _mm256_loadu_si256((const __m256i *)(q + 32));
#else
    for (int h = 0; h < 4; h++) t[h] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(q + 16 * h)));
#endif
}

static inline float hsum_max(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x [n_x, in_f] float (times in_scales [in_f] if given) -> q [n_x, in_f] int8, d [n_x, in_f/32] float:
   per block of 32, scale max|x|/127 and q = x/scale rounded to nearest, ties to even. */
static void q8_quantize(const float *x, const float *in_scales, int8_t *q, float *d, int64_t n_x, int64_t in_f) {
    const int64_t nb = in_f / Q8_BLOCK;
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t r = 0; r < n_x; r++)
        for (int64_t b = 0; b < nb; b++) {
            const float *xs = x + r * in_f + b * Q8_BLOCK;
            __m256 v[4], m = _mm256_setzero_ps();
            for (int j = 0; j < 4; j++) {
                v[j] = _mm256_loadu_ps(xs + 8 * j);
                if (in_scales) v[j] = _mm256_mul_ps(v[j], _mm256_loadu_ps(in_scales + b * Q8_BLOCK + 8 * j));
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
            }
            const float mx = hsum_max(m), inv = mx > 0.f ? 127.f / mx : 0.f;
            d[r * nb + b] = mx / 127.f;
            __m256i i[4];
            for (int j = 0; j < 4; j++) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));
            /* packs work within 128-bit halves: the permute puts the 32 bytes back in order */
            const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            _mm256_storeu_si256((__m256i *)(q + r * in_f + b * Q8_BLOCK), _mm256_permutevar8x32_epi32(w, order));
        }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOT4(a, b) _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
#else
#define DOT4(a, b) _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones)
#endif

#define Q8MATMUL(B)                                                                                  \
static void q8_matmul_##B(const int8_t *xq, const float *xd, const uint8_t *packed, const int8_t *qt,     \
                          const float *ts, const float *scales, const float *bias, float *y, int64_t n_x,     \
                          int64_t in_f, int64_t out_f, int64_t row_bytes, int64_t group_size, int n_threads) { \
    const int64_t nb = in_f / Q8_BLOCK, k = 1 << B;                                                  \
    const __m256i ones = _mm256_set1_epi16(1);                                                       \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                              \
    for (int64_t o = 0; o < out_f; o++) {                                                            \
        const int64_t g = group_size ? o / group_size : 0;                                           \
        __m256i t[4];                                                                                \
        tables_of(qt + g * (k < 16 ? 16 : k), B, t);                                                 \
        const uint8_t *p = packed + o * row_bytes, *end = packed + out_f * row_bytes;                \
        const float s = ts[g] * (scales ? scales[o] : 1.f), b0 = bias ? bias[o] : 0.f;               \
        if (n_x == 1) { /* decoding one sequence: two blocks per pass, independent sums */          \
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                               \
            int64_t b = 0;                                                                           \
            for (; b + 2 <= nb && p + (b + 1) * 4 * B + 32 <= end; b += 2) {                         \
                const __m256i w0 = lookup(indices32(p + b * 4 * B, B, 0), t, B);                     \
                const __m256i w1 = lookup(indices32(p + (b + 1) * 4 * B, B, 0), t, B);               \
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + b * Q8_BLOCK));         \
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + (b + 1) * Q8_BLOCK));   \
                const __m256i d0 = DOT4(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0));         \
                const __m256i d1 = DOT4(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(x1, w1));         \
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(xd[b]), a0);             \
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(xd[b + 1]), a1);         \
            }                                                                                        \
            for (; b < nb; b++) {                                                                    \
                const __m256i w = lookup(indices32(p + b * 4 * B, B, p + b * 4 * B + 32 > end), t, B); \
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * Q8_BLOCK));         \
                const __m256i dot = DOT4(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));           \
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xd[b]), a0);            \
            }                                                                                        \
            y[o] = s * hsum(_mm256_add_ps(a0, a1)) + b0;                                             \
            continue;                                                                                \
        }                                                                                            \
        for (int64_t r0 = 0; r0 < n_x; r0 += 4) {                                                    \
            const int nr = n_x - r0 < 4 ? (int)(n_x - r0) : 4;                                       \
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
            for (int64_t b = 0; b < nb; b++) {                                                       \
                const uint8_t *pb = p + b * 4 * B;                                                   \
                const __m256i w = lookup(indices32(pb, B, pb + 32 > end), t, B);                     \
                const __m256i aw = _mm256_sign_epi8(w, w);                                           \
                for (int r = 0; r < nr; r++) {                                                       \
                    const int64_t row = r0 + r;                                                      \
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + row * in_f + b * Q8_BLOCK)); \
                    const __m256i dot = DOT4(aw, _mm256_sign_epi8(xv, w));                          \
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xd[row * nb + b]), acc[r]); \
                }                                                                                    \
            }                                                                                        \
            for (int r = 0; r < nr; r++) y[(r0 + r) * out_f + o] = s * hsum(acc[r]) + b0;            \
        }                                                                                            \
    }                                                                                                \
}
Q8MATMUL(2)
Q8MATMUL(3)
Q8MATMUL(4)
Q8MATMUL(6)

typedef void (*q8_fn)(const int8_t *, const float *, const uint8_t *, const int8_t *, const float *, const float *,
                      const float *, float *, int64_t, int64_t, int64_t, int64_t, int64_t, int);

/* A weight as the integer path reads it, made once per layer (`Q8Weight` mirrors it). */
typedef struct {
    const uint8_t *packed; const int8_t *qt; const float *ts, *scales, *in_scales, *bias;
    int64_t in_f, out_f, row_bytes, group_size; int64_t bits;
} q8_weight;

/* y [n_x, out_f] = x [n_x, in_f] W^T (+ bias): quantize x, then the product; one call per product. */
void q8_linear(const q8_weight *w, const float *x, float *y, int64_t n_x, int n_threads) {
    int8_t *xq = malloc((size_t)(n_x * w->in_f));
    float *xd = malloc(sizeof(float) * (size_t)(n_x * (w->in_f / Q8_BLOCK)));
    q8_quantize(x, w->in_scales, xq, xd, n_x, w->in_f);
    const q8_fn f = w->bits == 2 ? q8_matmul_2 : w->bits == 3 ? q8_matmul_3 : w->bits == 4 ? q8_matmul_4 : q8_matmul_6;
    f(xq, xd, w->packed, w->qt, w->ts, w->scales, w->bias, y, n_x, w->in_f, w->out_f, w->row_bytes, w->group_size,
      n_threads);
    free(xq);
    free(xd);
}
#else
int q8_available(void) { return 0; }
void q8_linear(const void *w, const float *x, float *y, int64_t n_x, int n_threads) {}
#endif
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
    dll.q8_available.restype = ctypes.c_int
    dll.q8_linear.restype = None
    dll.q8_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int]  # weight x y n_x n_threads
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


# widths the integer path decodes; 8-bit weights keep the float path
Q8_BITS = (2, 3, 4, 6)
# activations are quantized to 8 bits per block of this many values
Q8_BLOCK = 32


def q8_usable(bits: int, in_f: int) -> bool:
    """Whether the integer path takes a weight of this width and input size (AVX2 with BMI2 here)."""
    dll = kernel()
    return dll is not None and bits in Q8_BITS and in_f % Q8_BLOCK == 0 and bool(dll.q8_available())


def q8_tables(tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[groups, 2^bits] float tables -> (int8 tables [groups, max(16, 2^bits)], float32 scale per table):
    entry ≈ scale · int8; tables of fewer than 16 entries padded with zeros (the kernel loads 16 at once)."""
    t = tables.float()
    scale = t.abs().amax(1) / 127
    q = torch.where(scale[:, None] > 0, t / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None], 0.0)
    q = torch.nn.functional.pad(q.round(), (0, max(0, 16 - t.shape[1])))
    return q.to(torch.int8).contiguous(), scale.contiguous()


class Q8Weight(ctypes.Structure):
    """The C side's `q8_weight`: pointers to a layer's buffers and its shape, built once per layer so that a
    product is one short call (`q8_linear`)."""

    _fields_ = [(f, ctypes.c_void_p) for f in ("packed", "qt", "ts", "scales", "in_scales", "bias")] + [
        (f, ctypes.c_int64) for f in ("in_f", "out_f", "row_bytes", "group_size", "bits")
    ]


class Q8Linear:
    """One palettized weight ready for `q8_linear`; holds the tensors its pointers point into."""

    def __init__(
        self,
        packed: torch.Tensor,
        qtables: torch.Tensor,
        qscales: torch.Tensor,
        scales: torch.Tensor | None,
        in_scales: torch.Tensor | None,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
        in_f: int,
    ):
        self.tensors = (packed, qtables, qscales, scales, in_scales, bias)
        self.out_f = packed.shape[0]
        self.weight = Q8Weight(
            *(_ptr(t) for t in self.tensors), in_f, self.out_f, packed.shape[1], group_size, bits
        )  # fmt: skip
        self.address = ctypes.addressof(self.weight)
        self.call = kernel().q8_linear  # type: ignore[union-attr]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] float32, contiguous, on the CPU -> [N, out] float32."""
        y = torch.empty(x.shape[0], self.out_f, dtype=torch.float32)
        self.call(self.address, x.data_ptr(), y.data_ptr(), x.shape[0], torch.get_num_threads())
        return y
