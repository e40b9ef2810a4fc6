from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import AdapterError, LoraConfig
from graftlm.lora.peft_io import Adapter, apply_adapter
from graftlm.train.eora import error_init, low_rank_error
from graftlm.train.synthetic import self_generated
from tests.conftest import write_tiny_checkpoint
from tests.train.test_distill import _mean_kl, _student


def _inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """[n, width] inputs with very unequal feature scales, as a projection's are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, width, dtype=torch.float64)


def _delta(out: int, width: int) -> torch.Tensor:
    return torch.randn(out, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_full_rank_reproduces_the_error() -> None:
    x, delta = _inputs(200, 24), _delta(16, 24)
    b, a, removed = low_rank_error(delta, x.T @ x / 200, rank=16)
    assert torch.allclose((b @ a).double(), delta, atol=1e-4) and removed == pytest.approx(1.0)


def test_rank_r_equals_reduced_rank_regression() -> None:
    # the best rank-r L for min ‖(Δ − L) Xᵀ‖ with X of full column rank: project Δ onto the r leading left
    # singular vectors of Δ Xᵀ (reduced-rank regression), computed here from the inputs themselves
    x, delta, r = _inputs(300, 24), _delta(16, 24), 4
    p, _, _ = torch.linalg.svd(delta @ x.T, full_matrices=False)
    want = p[:, :r] @ p[:, :r].T @ delta
    b, a, _ = low_rank_error(delta, x.T @ x / 300, rank=r, damp=0.0)
    got = (b @ a).double()
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))
    plain_u, plain_s, plain_vt = torch.linalg.svd(delta)  # the unweighted truncation is worse on these inputs
    plain = plain_u[:, :r] * plain_s[:r] @ plain_vt[:r]
    assert torch.linalg.norm((delta - got) @ x.T) < 0.9 * torch.linalg.norm((delta - plain) @ x.T)


def test_error_init_brings_the_student_closer_to_its_teacher(tiny_dir: Path, tmp_path: Path) -> None:
    teacher, tok = load_checkpoint(tiny_dir)
    student, _ = load_checkpoint(_student(tiny_dir, tmp_path / "s"))
    calib = self_generated(teacher, tok, 8, 48, seed=3)
    lora = LoraConfig(r=8, alpha=16.0)
    tensors, removed = error_init(teacher, student, calib, lora)
    assert len(tensors) == 2 * 7 * teacher.config.num_hidden_layers and 0 < removed < 1
    held = self_generated(teacher, tok, 4, 48, seed=999)  # text the initialisation never saw
    before = _mean_kl(teacher, student, held)
    apply_adapter(student, Adapter(lora, tensors, student.fingerprint()))
    after = _mean_kl(teacher, student, held)
    assert after < 0.95 * before, (before, after)


def test_error_init_refuses_dora(tiny_dir: Path) -> None:
    teacher, _ = load_checkpoint(tiny_dir)
    with pytest.raises(AdapterError, match="DoRA"):
        error_init(teacher, teacher, [[1, 2, 3]], LoraConfig(r=2, use_dora=True))


def test_error_init_refuses_a_teacher_of_another_depth(tiny_dir: Path, tmp_path: Path) -> None:
    student, _ = load_checkpoint(tiny_dir)
    teacher, _ = load_checkpoint(write_tiny_checkpoint(tmp_path / "shallow", num_hidden_layers=1))
    with pytest.raises(AdapterError, match="no such projection"):
        error_init(teacher, student, [[1, 2, 3]], LoraConfig(r=2))
