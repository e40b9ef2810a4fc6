import itertools

import pytest
import torch

from graftlm.quant import lut
from graftlm.quant.kmeans import kmeans
from graftlm.quant.pack import BITS, unpack
from graftlm.quant.palette import Palette


def lookup_reference(p: Palette) -> torch.Tensor:
    """Dequantize with plain Python loops: row r, column c -> tables[group of r][index]."""
    idx = p.indices().tolist()
    out = torch.empty(p.shape)
    for r, c in itertools.product(range(p.shape[0]), range(p.shape[1])):
        g = 0 if p.group_size == 0 else r // p.group_size
        scale = 1.0 if p.scales is None else float(p.scales[r])
        in_scale = 1.0 if p.in_scales is None else float(p.in_scales[c])
        out[r, c] = float(p.tables[g, idx[r][c]]) * scale * in_scale
    return out


@pytest.mark.parametrize(
    ("bits", "group", "row_scale"), [(2, 16, True), (3, 4, False), (4, 16, True), (6, 0, False), (8, 5, True)]
)
def test_dequantized_weight_equals_the_table_lookup(bits: int, group: int, row_scale: bool) -> None:
    w = torch.randn(37, 11, generator=torch.Generator().manual_seed(bits))
    p = Palette.of(w, bits, group, row_scale=row_scale)
    ref = lookup_reference(p)
    assert torch.equal(p.dense(), ref)
    assert p.tables.dtype == torch.float16 and p.tables.shape[1] == 1 << bits
    assert (p.scales is not None) == row_scale
    if lut.kernel() is not None:
        scales = None if p.scales is None else p.scales.float()
        assert torch.equal(lut.dequant(p.packed, p.tables.float(), scales, bits, group, 11), ref)
        rows = torch.tensor([36, 0, 17])
        assert torch.equal(lut.dequant(p.packed, p.tables.float(), scales, bits, group, 11, rows), ref[rows])
        x = torch.randn(3, 11, generator=torch.Generator().manual_seed(9))
        assert torch.allclose(lut.matmul(x, p.packed, p.tables.float(), scales, bits, group), x @ ref.T, atol=1e-5)


def test_four_bits_are_lossless_for_sixteen_distinct_values() -> None:
    values = torch.linspace(-1, 1, 16).half().float()  # representable in the float16 tables
    w = values[torch.randint(0, 16, (48, 40), generator=torch.Generator().manual_seed(0))]
    for group in (16, 0):
        assert torch.equal(Palette.of(w, 4, group).dense(), w)


def test_row_scales_help_rows_of_different_sizes() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) * torch.logspace(-2, 0, 16)[:, None]
    rel = lambda p: float(((p.dense() - w).square().sum(1) / w.square().sum(1)).max())  # noqa: E731
    assert rel(Palette.of(w, 3, 16, row_scale=True)) < 0.1 < rel(Palette.of(w, 3, 16))


def test_more_bits_give_less_error() -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    errors = [float((Palette.of(w, b).dense() - w).square().mean()) for b in BITS]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-3 * float(w.square().mean())


def test_input_scales_are_looked_up_and_spend_the_table_on_the_columns_that_matter() -> None:
    from tests.quant.helpers import output_error

    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g)
    act = torch.ones(64)
    act[:4] = 400.0  # four inputs carry most of the signal
    s = act**-0.25
    p = Palette.of(w, 3, 16, importance=act, row_scale=True, in_scales=s)
    assert torch.equal(p.dense(), lookup_reference(p))
    assert (
        torch.equal(p.in_scales, s.half())
        and p.storage_bits == Palette.of(w, 3, 16, row_scale=True).storage_bits + 64 * 16
    )
    plain = Palette.of(w, 3, 16, importance=act, row_scale=True)
    h = torch.diag(act)
    assert output_error(p.dense(), w, h) < 0.8 * output_error(plain.dense(), w, h)
    with pytest.raises(ValueError, match="positive"):
        Palette.of(w, 3, 16, in_scales=-s)


def optimal_1d(values: list[float], weights: list[float], k: int) -> float:
    """The least weighted squared error of any k clusters (dynamic programming over sorted values)."""
    pairs = sorted(zip(values, weights, strict=True))
    n = len(pairs)
    sw, swv, swv2 = [0.0], [0.0], [0.0]  # prefix sums make one cluster's cost O(1)
    for v, w in pairs:
        sw.append(sw[-1] + w)
        swv.append(swv[-1] + w * v)
        swv2.append(swv2[-1] + w * v * v)

    def cost(i: int, j: int) -> float:  # one cluster for pairs[i:j]
        m, s = sw[j] - sw[i], swv[j] - swv[i]
        return swv2[j] - swv2[i] - s * s / m

    best = [[float("inf")] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for c in range(1, k + 1):
        for j in range(1, n + 1):
            best[c][j] = min(best[c - 1][i] + cost(i, j) for i in range(j))
    return best[k][n]


def test_weighted_kmeans_is_near_the_optimum() -> None:
    # weight matrices are bell-shaped; Lloyd's algorithm from weighted quantiles lands near the optimum
    g = torch.Generator().manual_seed(2)
    v = torch.randn(3, 300, generator=g)
    w = torch.rand(3, 300, generator=g) + 0.1  # uneven importance
    cents, assign = kmeans(v, 4, w)
    for row in range(3):
        err = float((w[row] * (v[row] - cents[row, assign[row]]) ** 2).sum())
        best = optimal_1d(v[row].tolist(), w[row].tolist(), 4)
        assert best - 1e-4 <= err <= 1.02 * best


def test_importance_pulls_the_table_towards_important_values() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    imp = torch.ones(64)
    imp[:4] = 1000.0  # four input features matter much more
    plain, weighted = Palette.of(w, 2, 16), Palette.of(w, 2, 16, imp)
    err = lambda p: float((p.dense() - w)[:, :4].square().sum())  # noqa: E731
    assert err(weighted) < err(plain)


def integer_products_reference(x: torch.Tensor, p: Palette) -> torch.Tensor:
    """The integer path computed directly, in float64: x (times input scales) rounded to int8 per block of
    32 with scale max|x|/127, each table to int8 with scale max|t|/127, integer dot products per block."""
    xs = x.double() * (1 if p.in_scales is None else p.in_scales.double())
    blocks = xs.view(x.shape[0], -1, 32)
    xd = blocks.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(xd > 0, blocks / xd.clamp(min=1e-300), 0).round()
    t = p.tables.double()
    td = t.abs().amax(1, keepdim=True) / 127
    tq = torch.where(td > 0, t / td.clamp(min=1e-300), 0).round()
    idx = unpack(p.packed, p.bits, p.in_features)
    groups = (torch.arange(p.shape[0]) // p.group_size) if p.group_size else torch.zeros(p.shape[0], dtype=torch.long)
    wq = tq[groups[:, None], idx].view(p.shape[0], -1, 32)  # [out, blocks, 32] integers
    sums = torch.einsum("nbj,obj->nob", xq, wq)  # exact in float64
    y = (sums * xd[:, None, :, 0]).sum(-1) * td[groups, 0]
    return y * (1 if p.scales is None else p.scales.double())


@pytest.mark.parametrize(
    ("bits", "group", "row_scale", "in_scale"),
    [(2, 16, True, False), (3, 4, False, True), (4, 16, True, True), (6, 0, True, False)],
)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_integer_products_equal_a_direct_computation(
    bits: int, group: int, row_scale: bool, in_scale: bool, rows: int
) -> None:
    if not lut.q8_usable(bits, 96):
        pytest.skip("no integer LUT kernel here (needs a compiler and AVX2 with BMI2)")
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(37, 96, generator=g)
    in_scales = torch.rand(96, generator=g) + 0.5 if in_scale else None
    p = Palette.of(w, bits, group, row_scale=row_scale, in_scales=in_scales)
    x = torch.randn(rows, 96, generator=g)
    x[0, :32] = 0  # an all-zero block: scale 0, no division by it
    qt, qs = lut.q8_tables(p.tables)
    scales = None if p.scales is None else p.scales.float()
    in_scales = None if p.in_scales is None else p.in_scales.float()
    got = lut.Q8Linear(p.packed, qt, qs, scales, in_scales, None, bits, group, 96)(x)
    want = integer_products_reference(x, p)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    dense = x @ p.dense().T  # what they approximate
    assert float((got - dense).norm() / dense.norm()) < 0.02
