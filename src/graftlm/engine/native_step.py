"""One decode step of one sequence as a single native call: every layer of the model in C.

Decoding one sequence spends most of a step between the products when each operation is its own
PyTorch call: 30 layers of norms, rotations, attention, activations and residual adds, 210 projection
calls through Python, and the modules' own dispatch. Measured on the 3.5-bit mix (benchmarks/README.md,
"Compressed models"), the products took about a third of the step. `NativeStep` hands the whole stack
of decoder layers to C: the products are the same kernels (`graftlm.quant.lut`'s integer products for
palettized weights, `graftlm.model.linear`'s gemv for float32 ones, each LoRA adapter's two small
products on top), the rest is a few loops over 576 to 1536 values.

It covers what a plain decode step of one sequence is: float32 activations on the CPU, projections that
are float32 `nn.Linear`s or palettized layers (integer or float kernel, as the layer is set), each
optionally under one `LoRALinear` (no DoRA, no dropout), and a `KVCache` of one row. Anything else
(another dtype or device, DoRA, several sequences, no compiler) gets None from `build` and
decodes through the model's forward as before. The embedding, the final norm and the output head stay in
PyTorch: one call each.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import cache

import torch
from torch import nn

from graftlm.engine.kv_cache import KVCache
from graftlm.lora.layer import LoRALinear
from graftlm.model import linear as dense
from graftlm.model.llama import Llama
from graftlm.native import DOT, compile_library
from graftlm.quant import lut
from graftlm.quant.linear import PalettizedLinear

STEP = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t kind;                      /* 0: float32 weight [out, in]; 1: integer palettized (q8_weight);
                                          2: palettized on the float kernel */
    const float *w, *bias;             /* kind 0 and 2 (bias may be NULL) */
    const void *q8;                    /* kind 1 */
    const uint8_t *packed;             /* kind 2: indices, float32 tables, row and input scales (or NULL) */
    const float *tables, *scales, *in_scales;
    int64_t bits, group_size, row_bytes;
    const float *lora_a, *lora_b;      /* [r, in], [out, r]; NULL: no adapter */
    int64_t r; float lora_scale;
    int64_t in_f, out_f;
} proj_t;

typedef struct {
    const float *in_norm, *post_norm;
    proj_t q, k, v, o, gate, up, down;
} layer_t;

typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv, head_dim, inter, cache_len, max_rank;
    float eps;
    const layer_t *layers;
    float *k_cache, *v_cache;          /* [layers, 1, kv, cache_len, head_dim] */
} model_t;

/* y [n, out] = x [n, in] W^T (+ bias) (+ s B A x); tmp holds at least n * max(in_f, r) floats. */
static void project(const proj_t *p, const float *x, float *y, int64_t n, float *tmp, int n_threads) {
    if (p->kind == 0) gemv(x, p->w, p->bias, y, n, p->in_f, p->out_f, n_threads);
    else if (p->kind == 1) q8_linear(p->q8, x, y, n, n_threads);
    else {
        const float *xs = x;
        if (p->in_scales) {  /* W = W' diag(s), so W x = W' (s x) */
            for (int64_t r = 0; r < n; r++)
                for (int64_t i = 0; i < p->in_f; i++) tmp[r * p->in_f + i] = x[r * p->in_f + i] * p->in_scales[i];
            xs = tmp;
        }
        lut_matmul(xs, p->packed, p->tables, p->scales, y, n, p->in_f, p->out_f, p->row_bytes, (int)p->bits,
                   p->group_size, n_threads);
        if (p->bias)
            for (int64_t r = 0; r < n; r++)
                for (int64_t o = 0; o < p->out_f; o++) y[r * p->out_f + o] += p->bias[o];
    }
    if (p->lora_a) {  /* y += s B (A x) */
        for (int64_t r = 0; r < n; r++) {
            float *h = tmp + r * p->r;
            const float *xr = x + r * p->in_f;
            for (int64_t i = 0; i < p->r; i++) h[i] = p->lora_scale * dot(p->lora_a + i * p->in_f, xr, p->in_f);
            for (int64_t o = 0; o < p->out_f; o++) y[r * p->out_f + o] += dot(p->lora_b + o * p->r, h, p->r);
        }
    }
}

static void rms_norm(const float *x, const float *w, float *y, int64_t n, float eps) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

/* HF's rotate_half layout: x1 = x[:D/2], x2 = x[D/2:]; out = x cos + (-x2, x1) sin. */
static void rotate(float *x, const float *cos_, const float *sin_, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cos_[i] - b * sin_[i];
        x[i + h] = b * cos_[i + h] + a * sin_[i + h];
    }
}

/* h [n, hidden] in and out: the residual stream through every layer for n tokens at cache positions
   start..start+n-1 (each attending to every position up to its own), with cos, sin [n, head_dim]. */
void decode_step(const model_t *m, float *h, const float *cos_, const float *sin_, int64_t start, int64_t n,
                 int n_threads) {
    const int64_t H = m->hidden, D = m->head_dim, NH = m->n_heads, KV = m->n_kv, T = m->cache_len;
    const int64_t width = NH * D, kvw = KV * D, I = m->inter, end = start + n;
    const int64_t wide = I > width ? I : width, spare = n * (wide + (H > m->max_rank ? H : m->max_rank));
    float *buf = malloc(sizeof(float) * (size_t)(n * (H + 2 * width + 2 * kvw + 2 * I) + spare + n * NH * end));
    float *xn = buf, *q = xn + n * H, *att = q + n * width, *k = att + n * width, *v = k + n * kvw,
          *g = v + n * kvw, *u = g + n * I, *tmp = u + n * I, *scores = tmp + spare;
    const float scale = 1.f / sqrtf((float)D);
    for (int64_t l = 0; l < m->n_layers; l++) {
        const layer_t *L = m->layers + l;
        float *kc = m->k_cache + l * KV * T * D, *vc = m->v_cache + l * KV * T * D;
        for (int64_t r = 0; r < n; r++) rms_norm(h + r * H, L->in_norm, xn + r * H, H, m->eps);
        project(&L->q, xn, q, n, tmp, n_threads);
        project(&L->k, xn, k, n, tmp, n_threads);
        project(&L->v, xn, v, n, tmp, n_threads);
        for (int64_t r = 0; r < n; r++) {
            for (int64_t i = 0; i < NH; i++) rotate(q + r * width + i * D, cos_ + r * D, sin_ + r * D, D);
            for (int64_t j = 0; j < KV; j++) {
                rotate(k + r * kvw + j * D, cos_ + r * D, sin_ + r * D, D);
                memcpy(kc + (j * T + start + r) * D, k + r * kvw + j * D, sizeof(float) * (size_t)D);
                memcpy(vc + (j * T + start + r) * D, v + r * kvw + j * D, sizeof(float) * (size_t)D);
            }
        }
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t ri = 0; ri < n * NH; ri++) {  /* row r, head i, which reads kv head i / (NH / KV) */
            const int64_t r = ri / NH, i = ri % NH, last = start + r;
            const float *kh = kc + (i / (NH / KV)) * T * D, *vh = vc + (i / (NH / KV)) * T * D;
            const float *qi = q + r * width + i * D;
            float *s = scores + ri * end, mx = -INFINITY, sum = 0.f;
            for (int64_t t = 0; t <= last; t++) {
                s[t] = scale * dot(qi, kh + t * D, D);
                mx = s[t] > mx ? s[t] : mx;
            }
            for (int64_t t = 0; t <= last; t++) sum += (s[t] = expf(s[t] - mx));
            float *o = att + r * width + i * D;
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;
            for (int64_t t = 0; t <= last; t++) {
                const float w = s[t] / sum;
                for (int64_t d = 0; d < D; d++) o[d] += w * vh[t * D + d];
            }
        }
        project(&L->o, att, xn, n, tmp, n_threads);
        for (int64_t i = 0; i < n * H; i++) h[i] += xn[i];
        for (int64_t r = 0; r < n; r++) rms_norm(h + r * H, L->post_norm, xn + r * H, H, m->eps);
        project(&L->gate, xn, g, n, tmp, n_threads);
        project(&L->up, xn, u, n, tmp, n_threads);
        for (int64_t i = 0; i < n * I; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
        project(&L->down, g, xn, n, tmp, n_threads);
        for (int64_t i = 0; i < n * H; i++) h[i] += xn[i];
    }
    free(buf);
}
"""


@cache
def kernel() -> ctypes.CDLL | None:
    """The compiled step, or None (no compiler, GRAFTLM_KERNEL=never, or no integer LUT kernel here)."""
    if lut.kernel() is None or not lut.kernel().q8_available():  # type: ignore[union-attr]
        return None
    dll = compile_library("decode_step", DOT + lut.SOURCE + dense.SOURCE + STEP)
    if dll is None:
        return None
    dll.decode_step.restype = None
    dll.decode_step.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return dll


class Proj(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int64),
        ("w", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("q8", ctypes.c_void_p),
        ("packed", ctypes.c_void_p),
        ("tables", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("in_scales", ctypes.c_void_p),
        ("bits", ctypes.c_int64),
        ("group_size", ctypes.c_int64),
        ("row_bytes", ctypes.c_int64),
        ("lora_a", ctypes.c_void_p),
        ("lora_b", ctypes.c_void_p),
        ("r", ctypes.c_int64),
        ("lora_scale", ctypes.c_float),
        ("in_f", ctypes.c_int64),
        ("out_f", ctypes.c_int64),
    ]


PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class Layer(ctypes.Structure):
    _fields_ = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p)] + [(p, Proj) for p in PROJECTIONS]


class Model(ctypes.Structure):
    _fields_ = [
        (f, ctypes.c_int64)
        for f in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter", "cache_len", "max_rank")
    ] + [
        ("eps", ctypes.c_float),
        ("layers", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
    ]


class Unsupported(Exception):
    """A module the native step does not compute (the caller then decodes through the model)."""


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise Unsupported(f"a {t.dtype} tensor on {t.device}")
    return t


def _describe(module: nn.Module, keep: list[object]) -> Proj:
    p = Proj()
    base = module
    if isinstance(module, LoRALinear):
        if module.magnitude is not None or not isinstance(module.dropout, nn.Identity):
            raise Unsupported("DoRA or adapter dropout")
        a, b = _float32(module.lora_A.detach()), _float32(module.lora_B.detach())
        keep += [a, b]
        p.lora_a, p.lora_b, p.r, p.lora_scale = a.data_ptr(), b.data_ptr(), module.r, module.scale  # type: ignore[union-attr]
        base = module.base
    if isinstance(base, PalettizedLinear):
        if not base.packed.is_contiguous():
            raise Unsupported("non-contiguous indices")
        k = base.kernel_tables()
        keep.append(k)
        if k.integer is not None:
            p.kind, p.q8 = 1, k.integer.address
        else:
            bias = _float32(None if base.bias is None else base.bias.detach())
            keep.append(bias)
            p.kind, p.packed, p.tables = 2, base.packed.data_ptr(), k.tables.data_ptr()
            p.scales, p.in_scales, p.bias = (None if t is None else t.data_ptr() for t in (k.scales, k.in_scales, bias))
            p.bits, p.group_size, p.row_bytes = base.bits, base.group_size, base.packed.shape[1]
    elif type(base) is dense.Linear:
        w, bias = _float32(base.weight.detach()), _float32(None if base.bias is None else base.bias.detach())
        keep += [w, bias]
        p.kind, p.w, p.bias = 0, w.data_ptr(), None if bias is None else bias.data_ptr()  # type: ignore[union-attr]
    else:
        raise Unsupported(type(base).__name__)
    p.out_f, p.in_f = base.out_features, base.in_features
    return p


class NativeStep:
    """The decoder layers of `model` for one sequence, as one C call per step (see the module's doc)."""

    def __init__(self, model: Llama, cache: KVCache, dll: ctypes.CDLL):
        c = model.config
        self.model, self.dll, self.cache = model, dll, cache
        self.keep: list[object] = [cache.k, cache.v]  # what the pointers point into
        self.layers = (Layer * c.num_hidden_layers)()
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            modules = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            for name, module in zip(PROJECTIONS, modules, strict=True):
                setattr(self.layers[i], name, _describe(module, self.keep))
            norms = [
                _float32(layer.input_layernorm.weight.detach()),
                _float32(layer.post_attention_layernorm.weight.detach()),
            ]
            self.keep += norms
            self.layers[i].in_norm, self.layers[i].post_norm = (n.data_ptr() for n in norms)  # type: ignore[union-attr]
        max_rank = max(getattr(self.layers[i], n).r for i in range(c.num_hidden_layers) for n in PROJECTIONS)
        self.desc = Model(
            c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, cache.max_len, max_rank, c.rms_norm_eps, ctypes.addressof(self.layers),
            cache.k.data_ptr(), cache.v.data_ptr(),
        )  # fmt: skip

    @classmethod
    def build(cls, model: Llama, cache: KVCache) -> NativeStep | None:
        """The native step for `model` decoding into `cache` (one row), or None where it does not apply."""
        dll = kernel()
        if dll is None or cache.k.shape[1] != 1 or model.dtype != torch.float32 or model.device.type != "cpu":
            return None
        if cache.k.dtype != torch.float32 or not (cache.k.is_contiguous() and cache.v.is_contiguous()):
            return None
        try:
            return cls(model, cache, dll)
        except Unsupported:
            return None

    # the most tokens one call takes: a speculative step verifies its drafts and the last token at once
    MAX_TOKENS = 17

    def __call__(self, tokens: Sequence[int], start: int) -> torch.Tensor:
        """Logits [len(tokens), V] float32 for `tokens` at cache positions (and rotary positions) start,
        start+1, ...: each token attends to the cache up to its own position, which it writes."""
        n = len(tokens)
        if not 1 <= n <= self.MAX_TOKENS or start + n > self.cache.max_len:
            raise ValueError(f"{n} tokens at {start}: the native step takes 1-{self.MAX_TOKENS} within the cache")
        h = self.model.embed_tokens(torch.tensor(list(tokens))).float().contiguous()  # [n, hidden]
        rotary = self.model.rotary
        cos, sin = rotary.cos[start : start + n].contiguous(), rotary.sin[start : start + n].contiguous()
        self.dll.decode_step(
            ctypes.addressof(self.desc), h.data_ptr(), cos.data_ptr(), sin.data_ptr(), start, n,
            torch.get_num_threads(),
        )  # fmt: skip
        return self.model.logits(h)
