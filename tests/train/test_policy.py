"""The RL pieces against direct computations: advantages, answer log-probs, the loss and its gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graftlm.errors import ConfigError
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import add_lora, lora_layers
from graftlm.train import policy
from graftlm.train.policy import (
    ChunkedLinearLogprob,
    Rollouts,
    adapter_off,
    leave_one_out,
    policy_loss,
    token_logprobs,
)


def test_leave_one_out_is_each_reward_minus_the_mean_of_the_others() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.25], [3.0, 3.0, 3.0, 3.0]])
    got = leave_one_out(rewards)
    for p in range(2):
        for i in range(4):
            others = [float(rewards[p, j]) for j in range(4) if j != i]
            assert float(got[p, i]) == pytest.approx(float(rewards[p, i]) - sum(others) / 3)
    assert torch.equal(got[1], torch.zeros(4))  # all alike: no signal
    with pytest.raises(ConfigError, match="at least 2"):
        leave_one_out(torch.ones(3, 1))


def test_chunked_logprob_and_its_gradient_equal_log_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "CHUNK_ROWS", 3)  # several chunks and a short last one
    torch.manual_seed(0)
    h = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64)
    y = torch.randint(0, 40, (8,))
    g = torch.randn(8, dtype=torch.float64)
    got = ChunkedLinearLogprob.apply(h, w, y)
    (grad,) = torch.autograd.grad((got * g).sum(), h)
    want = (h @ w.t()).log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    (want_grad,) = torch.autograd.grad((want * g).sum(), h)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-6)


def _model(tiny_dir: Path):  # type: ignore[no-untyped-def]
    model, tok = load_checkpoint(tiny_dir)
    torch.manual_seed(3)
    add_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0, 0.05)  # a policy that is not the base
    return model, tok


def _rollouts(tok, k: int = 3) -> Rollouts:  # type: ignore[no-untyped-def]
    prompt = tok.encode_chat([{"role": "user", "content": "Summarize this email in one line, please."}])
    answers = [tok.encode("The quick brown fox"), tok.encode("Meeting on Tuesday at 3pm"), tok.encode("teh cat")]
    return Rollouts.of([prompt] * k, answers[:k], torch.tensor([0.5, -1.0, 0.5][:k]), tok.pad_id)


def _direct_logprobs(model, batch: Rollouts) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Every row on its own through the whole model, full logits, log-softmax: the plain computation."""
    out = []
    for b in range(batch.tokens.shape[0]):
        n = int(batch.answer[b].nonzero()[-1]) + 1
        row = batch.tokens[b : b + 1, :n]
        logp = model.logits(model.hidden(row))[0].log_softmax(-1)  # [n, V]
        for s in batch.answer[b, :n].nonzero()[:, 0].tolist():
            out.append(logp[s - 1, row[0, s]])
    return torch.stack(out)


def test_answer_logprobs_equal_each_row_computed_alone(tiny_dir: Path) -> None:
    model, tok = _model(tiny_dir)
    batch = _rollouts(tok)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(model, batch), _direct_logprobs(model, batch), rtol=1e-5, atol=1e-5)
        with adapter_off(model):
            base = token_logprobs(model, batch)
        assert not torch.allclose(base, token_logprobs(model, batch))
    plain, _ = load_checkpoint(tiny_dir)
    with torch.no_grad():
        torch.testing.assert_close(base, _direct_logprobs(plain, batch), rtol=1e-5, atol=1e-5)


def _direct_loss(logp, old, ref, batch, algo, beta=0.1, clip=0.2, eta=0.5):  # type: ignore[no-untyped-def]
    """The loss written out row by row, token by token."""
    seq = batch.seq.tolist()
    rows = []
    for b in range(batch.tokens.shape[0]):
        terms = []
        a = float(batch.advantages[b])
        for t in (i for i, s in enumerate(seq) if s == b):
            ratio = torch.exp(logp[t] - old[t])
            if algo == "rloo":
                pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
            else:
                pg = -ratio * a + (ratio * torch.log(ratio) - ratio + 1) / eta
            d = ref[t] - logp[t]
            terms.append(pg + beta * (torch.exp(d) - d - 1))
        rows.append(torch.stack(terms).mean())
    return torch.stack(rows).mean()


@pytest.mark.parametrize("algo", ["rloo", "mdloo"])
def test_loss_gradient_equals_autograd_of_the_direct_computation(tiny_dir: Path, algo: str) -> None:
    model, tok = _model(tiny_dir)
    batch = _rollouts(tok)
    params = [p for _, layer in lora_layers(model) for p in (layer.lora_A, layer.lora_B)]
    with torch.no_grad():
        n = int(batch.answer.sum())
        old = token_logprobs(model, batch) + torch.linspace(-0.4, 0.4, n)  # the sampler differed a little
        with adapter_off(model):
            ref = token_logprobs(model, batch)
    got = policy_loss(token_logprobs(model, batch), old, ref, batch.seq, batch.advantages, algo, 0.1, 0.2, 0.5)
    grads = torch.autograd.grad(got.loss, params)
    want = _direct_loss(_direct_logprobs(model, batch), old, ref, batch, algo)
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_first_update_is_the_leave_one_out_policy_gradient(tiny_dir: Path) -> None:
    """On the sampler's own answers (ratio 1), with no KL weight, both algorithms' gradient is
    -mean over rows of A_i · ∇(mean log-prob of row i's tokens): REINFORCE with the leave-one-out baseline."""
    model, tok = _model(tiny_dir)
    batch = _rollouts(tok)
    params = [p for _, layer in lora_layers(model) for p in (layer.lora_A, layer.lora_B)]
    want = None
    for algo in ("rloo", "mdloo"):
        logp = token_logprobs(model, batch)
        loss = policy_loss(logp, logp.detach(), logp.detach(), batch.seq, batch.advantages, algo, beta=0.0).loss
        got = torch.autograd.grad(loss, params)
        if want is None:
            logp = _direct_logprobs(model, batch)
            seq = batch.seq
            per_row = torch.stack([logp[seq == b].mean() for b in range(3)])
            want = torch.autograd.grad(-(batch.advantages * per_row).mean(), params)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_kl_terms_are_zero_when_the_policy_is_the_reference() -> None:
    logp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    terms = policy_loss(logp, logp, logp, torch.tensor([0, 0, 1]), torch.tensor([1.0, -1.0]), "mdloo", beta=1.0)
    assert terms.kl_ref == 0.0 and terms.kl_ref_seq == 0.0
    with pytest.raises(ConfigError, match="unknown algorithm"):
        policy_loss(logp, logp, logp, torch.tensor([0, 0, 1]), torch.tensor([1.0, -1.0]), "ppo")


def test_rollouts_are_made_on_the_models_device() -> None:
    batch = Rollouts.of([[1, 2]], [[3, 4]], torch.tensor([0.5]), pad=0, device="meta")
    assert {t.device.type for t in (batch.tokens, batch.answer, batch.advantages)} == {"meta"}
