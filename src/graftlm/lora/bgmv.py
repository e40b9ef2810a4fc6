"""A batched gather matrix-vector kernel (Punica's BGMV) for the CPU: y_n += c_n · (x_n A[s_n]) B[s_n].

Every token n reads its own adapter's A [in, r] and B [r, out] straight from the slot stacks, once, with
no gathered copy and one call per projection (PyTorch ops need a copy of every row's matrices, or a
dozen small matmuls per distinct adapter, and both cost more than the adapters themselves here).

The C source below is compiled on first use (`graftlm.native`) and called through ctypes. Without a
compiler, or with GRAFTLM_KERNEL=never, `kernel()` returns None and the PyTorch paths in `batched.py`
are used.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import torch

from graftlm.native import compile_library

SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t v) { uint32_t u = ((uint32_t)v) << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float from_f32(float v) { return v; }

#define RMAX 64

/* y[n, :] += w[n] * scale[s] * (x[n, :] @ A[s]) @ B[s] for the tokens n of every work item.
   Work item j covers tokens order[start[j] .. start[j+1]), which all use slot slot[j]: one thread
   runs them back to back, so the adapter is read from memory once and from cache after.
   x [n_tok, in], y [n_tok, out] float32; A [n_slots, r, in], B [n_slots, r, out]; scale [n_slots];
   w [n_tok] float32 or NULL (all 1). */
#define BGMV(NAME, T, LOAD)                                                                         \
static inline void NAME##_row(const float *xn, float *yn, const T *a, const T *b, float c,          \
                              int64_t in_f, int64_t out_f, int64_t r) {                             \
    float h[RMAX];                                                                                  \
    for (int64_t k = 0; k < r; k++) {                                                               \
        const T *ak = a + k * in_f;                                                                 \
        float acc = 0.f;                                                                            \
        for (int64_t i = 0; i < in_f; i++) acc += xn[i] * LOAD(ak[i]);                              \
        h[k] = acc;                                                                                 \
    }                                                                                               \
    for (int64_t k = 0; k < r; k++) {                                                               \
        const float hk = h[k] * c;                                                                  \
        const T *bk = b + k * out_f;                                                                \
        for (int64_t o = 0; o < out_f; o++) yn[o] += hk * LOAD(bk[o]);                              \
    }                                                                                               \
}                                                                                                   \
void NAME(const float *x, float *y, const int64_t *order, const int64_t *start, const int64_t *slot,\
          const float *w, const float *scale, const T *A, const T *B, int64_t n_items,              \
          int64_t in_f, int64_t out_f, int64_t r, int n_threads) {                                  \
    _Pragma("omp parallel for num_threads(n_threads) schedule(dynamic, 1)")                          \
    for (int64_t j = 0; j < n_items; j++) {                                                         \
        const int64_t s = slot[j];                                                                  \
        const T *a = A + s * in_f * r, *b = B + s * r * out_f;                                      \
        for (int64_t q = start[j]; q < start[j + 1]; q++) { /* same adapter: it stays in cache */   \
            const int64_t n = order[q];                                                             \
            const float c = scale[s] * (w ? w[n] : 1.f);                                            \
            if (r == 16) NAME##_row(x + n * in_f, y + n * out_f, a, b, c, in_f, out_f, 16);         \
            else NAME##_row(x + n * in_f, y + n * out_f, a, b, c, in_f, out_f, r);                  \
        }                                                                                           \
    }                                                                                               \
}

BGMV(bgmv_bf16, uint16_t, from_bf16)
BGMV(bgmv_f32, float, from_f32)
"""

MAX_RANK = 64  # the kernel keeps x·A in stack buffers of 64 floats per token
GROUP = 8  # tokens per work item: they run back to back on one thread, sharing one read of their adapter


@dataclass(frozen=True)
class WorkItems:
    """Tokens sorted by adapter slot and cut into items of at most GROUP tokens of one slot."""

    order: torch.Tensor  # [n] token indices, by slot
    start: torch.Tensor  # [items + 1] offsets into order
    slot: torch.Tensor  # [items]

    @classmethod
    def of(cls, idx: torch.Tensor) -> WorkItems:
        """From each token's slot (-1: no adapter, left out)."""
        keep = (idx >= 0).nonzero().squeeze(1)
        slots = idx[keep]
        order = keep[torch.argsort(slots, stable=True)]
        sorted_slots = idx[order]
        n = order.numel()
        dev = idx.device
        if n == 0:
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return cls(empty, torch.zeros(1, dtype=torch.long, device=dev), empty)
        pos = torch.arange(n, device=dev)
        new_run = torch.ones(n, dtype=torch.bool, device=dev)
        new_run[1:] = sorted_slots[1:] != sorted_slots[:-1]
        run_start = torch.cummax(torch.where(new_run, pos, 0), 0).values  # start of each token's run
        first = new_run | ((pos - run_start) % GROUP == 0)
        starts = first.nonzero().squeeze(1)
        return cls(
            order.contiguous(),
            torch.cat([starts, torch.tensor([n], device=dev)]).contiguous(),
            sorted_slots[starts].contiguous(),
        )


@cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (no compiler, failed build, or GRAFTLM_KERNEL=never)."""
    dll = compile_library("bgmv", SOURCE)
    if dll is None:
        return None
    for fn in (dll.bgmv_bf16, dll.bgmv_f32):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    return dll


def bgmv(
    x: torch.Tensor,
    y: torch.Tensor,
    items: WorkItems,
    weights: torch.Tensor | None,
    scale: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
) -> None:
    """y [N, out] += weights[n] · scale[s] · (x[n] @ A[s]) @ B[s] in place, for the tokens in `items`.

    x [N, in] float32, weights [N] float32 or None, scale [slots] float32, A [slots, r, in] and
    B [slots, r, out] in bfloat16 or float32; everything contiguous on the CPU.
    """
    dll = kernel()
    assert dll is not None, "bgmv kernel not available"
    in_f = x.shape[1]
    r, out_f = B.shape[1], B.shape[2]
    if r > MAX_RANK:
        raise ValueError(f"the BGMV kernel handles rank <= {MAX_RANK}, got {r}")
    tensors = [x, y, scale, A, B, items.order, items.start, items.slot] + ([weights] if weights is not None else [])
    if any(not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
        raise ValueError("bgmv needs contiguous CPU tensors")
    fn = dll.bgmv_bf16 if A.dtype == torch.bfloat16 else dll.bgmv_f32
    fn(
        x.data_ptr(),
        y.data_ptr(),
        items.order.data_ptr(),
        items.start.data_ptr(),
        items.slot.data_ptr(),
        None if weights is None else weights.data_ptr(),
        scale.data_ptr(),
        A.data_ptr(),
        B.data_ptr(),
        items.slot.numel(),
        in_f,
        out_f,
        r,
        torch.get_num_threads(),
    )
