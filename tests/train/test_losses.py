"""The loss's fast paths against plain ones: the chunked linear cross-entropy, and a shared prefix run once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import add_lora, lora_layers
from graftlm.train import losses
from graftlm.train.data import Batch


def test_chunked_equals_plain_loss_and_gradient(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(losses, "CHUNK_ROWS", 7)  # several chunks, the last one short
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 32, generator=g)
    labels = torch.randint(0, 300, (45,), generator=g)
    h1 = torch.randn(45, 32, generator=g, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    want = F.cross_entropy(h1 @ weight.t(), labels, reduction="sum")
    got = losses.ChunkedLinearCrossEntropy.apply(h2, weight, labels)
    (want * 0.5).backward()
    (got * 0.5).backward()
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-5)


def _batch(vocab: int, shared: int, first_target: int) -> Batch:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (4, 30), generator=g)
    tokens[:, :shared] = tokens[0, :shared]
    targets = torch.zeros_like(tokens, dtype=torch.bool)
    targets[:, first_target:] = True
    targets[3, 24:] = False  # a shorter row (right padding)
    return Batch(tokens, targets, int(targets.sum()))


@pytest.mark.parametrize("shared, first_target, expect", [(12, 20, 12), (12, 10, 9), (5, 20, 0), (30, 20, 19)])
def test_shared_prefix_is_run_once_with_the_same_loss_and_gradients(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, shared: int, first_target: int, expect: int
) -> None:
    """Shared up to `shared` tokens, targets from `first_target`: the prefix stops before the first target's
    context, and the loss and every adapter gradient equal the plain batch's."""
    model, _ = load_checkpoint(tiny_dir)
    add_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # B is zero at init: make the adapters matter
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.05)
    batch = _batch(model.config.vocab_size, shared, first_target)
    assert losses.shared_prefix(model, batch) == expect

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss, n = losses.completion_loss(model, batch)
        loss.backward()
        assert n == int(batch.targets[:, 1:].sum())
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    loss, grads = run()
    monkeypatch.setattr(losses, "MIN_SHARED", 10_000)  # the plain path
    assert losses.shared_prefix(model, batch) == 0
    want_loss, want_grads = run()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):  # float32 sums in another order
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_no_shared_prefix_for_one_row_or_dropout(tiny_dir: Path) -> None:
    model, _ = load_checkpoint(tiny_dir)
    batch = _batch(model.config.vocab_size, 12, 20)
    assert losses.shared_prefix(model, Batch(batch.tokens[:1], batch.targets[:1], 0)) == 0
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    model.train()
    assert losses.shared_prefix(model, batch) == 0  # each row must draw its own dropout mask
    model.eval()
    assert losses.shared_prefix(model, batch) == 12


def test_chunked_kl_equals_plain_kl_and_gradient(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(losses, "CHUNK_ROWS", 7)  # several chunks, the last one short
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 32, generator=g)
    teacher = torch.randn(45, 300, generator=g) * 3
    h1 = torch.randn(45, 32, generator=g, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    s_logp, t_logp = F.log_softmax(h1 @ weight.t(), -1), F.log_softmax(teacher, -1)
    want = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum")
    got = losses.ChunkedLinearKL.apply(h2, weight, lambda i, j: teacher[i:j])
    (want * 0.5).backward()
    (got * 0.5).backward()
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-5)
