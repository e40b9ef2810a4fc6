"""Palette tuning: the hand-written gradient against autograd of the plain lookup, and tuning against the
teacher it imitates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graftlm.loading.checkpoint import load_checkpoint
from graftlm.loading.palettized import read_layout, save_palettized
from graftlm.quant.linear import PalettizedLinear
from graftlm.quant.model import EMBED, apply_palettes, dense_weights, palettized_modules
from graftlm.quant.palette import Palette
from graftlm.recipes.tune import SCALE_RATE, TunableLinear, tune_palettes
from graftlm.train.data import collate
from graftlm.train.distill import as_examples, kl_loss
from graftlm.train.synthetic import self_generated
from graftlm.train.trainer import TrainConfig


def _layer(row_scale: bool, in_scale: bool) -> PalettizedLinear:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 24, generator=g)
    s = torch.rand(24, generator=g) + 0.5 if in_scale else None
    return PalettizedLinear(Palette.of(w, 3, 16, row_scale=row_scale, in_scales=s))


@pytest.mark.parametrize(("row_scale", "in_scale"), [(True, True), (True, False), (False, False)])
def test_tunable_layer_gradients_equal_autograd_of_the_plain_lookup(row_scale: bool, in_scale: bool) -> None:
    layer = _layer(row_scale, in_scale)
    tun = TunableLinear(layer)
    with torch.no_grad():  # away from the starting point, so every factor matters
        tun.tables.add_(0.1 * torch.randn_like(tun.tables))
        for p in (tun.log_row, tun.log_in):
            if p is not None:
                p.normal_(0, 0.1)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    up = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    (tun(x) * up).sum().backward()

    # the reference: the palette's own dequantization written with plain tensor ops
    tables = tun.tables.detach().clone().requires_grad_(True)
    log_row = torch.zeros(40) if tun.log_row is None else tun.log_row.detach().clone().requires_grad_(True)
    log_in = torch.zeros(24) if tun.log_in is None else tun.log_in.detach().clone().requires_grad_(True)
    w = tables[layer.palette.row_groups()[:, None], layer.palette.indices()]
    if layer.scales is not None:
        w = w * (layer.scales.float() * (SCALE_RATE * log_row).exp())[:, None]
    if layer.in_scales is not None:
        w = w * (layer.in_scales.float() * (SCALE_RATE * log_in).exp())[None, :]
    (x @ w.T * up).sum().backward()
    torch.testing.assert_close(tun.weight(), w)
    torch.testing.assert_close(tun.tables.grad, tables.grad, rtol=1e-4, atol=1e-5)
    for mine, ref in ((tun.log_row, log_row), (tun.log_in, log_in)):
        assert (mine is None) == (ref.grad is None)
        if mine is not None:
            torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_an_untrained_tunable_layer_computes_what_the_palettized_one_does() -> None:
    layer = _layer(True, True)
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(TunableLinear(layer)(x), layer(x), rtol=1e-5, atol=1e-5)


def _mean_kl(teacher, student, sequences) -> float:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        total, n = kl_loss(teacher)(student, collate(as_examples(sequences, "t"), 0))
    return float(total) / n


def test_tuning_brings_the_palettized_model_closer_to_its_teacher(tiny_dir: Path, tmp_path: Path) -> None:
    teacher, tok = load_checkpoint(tiny_dir)
    student, _ = load_checkpoint(tiny_dir)
    g = torch.Generator().manual_seed(0)
    palettes = {  # projections at 2 bits, some with input scales; the embedding, which is not tuned, at 8
        n: Palette.of(
            w,
            8 if n == EMBED else 2,
            16,
            row_scale=True,
            in_scales=torch.rand(w.shape[1], generator=g) + 0.5 if i % 2 else None,
        )
        for i, (n, w) in enumerate(dense_weights(student))
    }
    apply_palettes(student, palettes)
    before_packed = {n: m.packed.clone() for n, m in palettized_modules(student)}
    before_embed = student.embed_tokens.lut.tables.clone()
    train = self_generated(teacher, tok, 16, 48, seed=0)
    held = self_generated(teacher, tok, 4, 48, seed=999)  # text it never trains on
    kl_train, kl_held = _mean_kl(teacher, student, train), _mean_kl(teacher, student, held)

    result = tune_palettes(student, teacher, train, TrainConfig(lr=3e-2, batch_size=4), 24, 0)

    assert result.steps == 24
    assert _mean_kl(teacher, student, train) < 0.8 * kl_train
    assert _mean_kl(teacher, student, held) < 0.95 * kl_held
    modules = dict(palettized_modules(student))
    assert all(type(m) is PalettizedLinear and m.tables.dtype == torch.float16 for m in modules.values())
    assert all(torch.equal(modules[n].packed, p) for n, p in before_packed.items())  # indices as they were
    assert torch.equal(student.embed_tokens.lut.tables, before_embed)  # the embedding is not tuned
    out = tmp_path / "tuned"
    save_palettized(out, student, tok, {"note": "tuned"})
    again, _ = load_checkpoint(out)
    assert read_layout(out).record == {"note": "tuned"}
    tokens = torch.tensor([list(s) for s in held])
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), student(tokens))


def test_tuning_needs_sequences_and_steps(tiny_dir: Path) -> None:
    model, _ = load_checkpoint(tiny_dir)
    with pytest.raises(ValueError, match="at least one step"):
        tune_palettes(model, model, [[1, 2, 3]], TrainConfig(), 0, 0)
