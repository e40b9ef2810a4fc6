"""The chunked linear cross-entropy against the plain one: same loss, same gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graftlm.train import losses


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
