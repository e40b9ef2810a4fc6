from __future__ import annotations

import json
from pathlib import Path

import torch

from graftlm.cli.main import main
from graftlm.eval.perplexity import text_chunks
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.loading.palettized import save_palettized
from graftlm.lora.peft_io import apply_adapter, read_adapter
from graftlm.quant.palettize import PalettizeConfig, palettize
from graftlm.train.data import collate
from graftlm.train.distill import as_examples, kl_loss
from graftlm.train.synthetic import self_generated
from tests.conftest import CORPUS


def _student(tiny_dir: Path, out: Path) -> Path:
    model, tok = load_checkpoint(tiny_dir)
    palettize(model, PalettizeConfig(bits=2, choices=(2,), weighting="none", gptq=False))
    save_palettized(out, model, tok, {})
    return out


def _mean_kl(teacher, student, sequences) -> float:  # type: ignore[no-untyped-def]
    batch = collate(as_examples(sequences, "t"), 0)
    with torch.no_grad():
        total, n = kl_loss(teacher)(student, batch)
    return float(total) / n


def test_kl_loss_equals_a_plain_reference(tiny_dir: Path, tmp_path: Path) -> None:
    teacher, _ = load_checkpoint(tiny_dir)
    student, _ = load_checkpoint(_student(tiny_dir, tmp_path / "s"))
    tokens = torch.randint(0, teacher.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.softmax(teacher(tokens)[:, :-1], -1)
        q = torch.softmax(student(tokens)[:, :-1], -1)
        want = float((p * (p.log() - q.log())).sum())
    assert abs(_mean_kl(teacher, student, tokens.tolist()) * 16 - want) <= 1e-3 * want


def test_recover_closes_the_gap_on_text_it_never_saw(tiny_dir: Path, tmp_path: Path) -> None:
    student_dir = _student(tiny_dir, tmp_path / "student")
    out = tmp_path / "recovery"
    args = ["recover", "--teacher", str(tiny_dir), "--student", str(student_dir), "--out", str(out)]
    args += ["--samples", "32", "--length", "48", "--epochs", "8", "--batch", "4", "--lr", "1e-2", "--rank", "8"]
    assert main(args) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["kind"] == "accuracy-recovery" and record["teacher"]["name"] == str(tiny_dir)
    assert record["init"]["method"] == "error" and 0 < record["init"]["removed"] < 1
    teacher, tok = load_checkpoint(tiny_dir)
    held = self_generated(teacher, tok, 4, 48, seed=999)  # text the adapter never saw
    student, _ = load_checkpoint(student_dir)
    before = _mean_kl(teacher, student, held)
    apply_adapter(student, read_adapter(out))  # the fingerprint is the student's: no force needed
    after = _mean_kl(teacher, student, held)
    assert after < 0.85 * before, (before, after)


def test_recover_takes_at_most_data_samples_pieces_of_its_data(tiny_dir: Path, tmp_path: Path) -> None:
    student_dir = _student(tiny_dir, tmp_path / "student")
    data = tmp_path / "data.txt"
    data.write_text(" ".join(CORPUS * 4))
    _, tok = load_checkpoint(tiny_dir)
    assert len(text_chunks(tok, [data.read_text()], 32)) > 6
    out = tmp_path / "recovery"
    args = [
        "recover",
        "--teacher",
        str(tiny_dir),
        "--student",
        str(student_dir),
        "--out",
        str(out),
        "--data",
        str(data),
    ]
    args += ["--samples", "2", "--length", "32", "--epochs", "1", "--batch", "4", "--rank", "2"]
    assert main([*args, "--data-samples", "6", "--init", "zero"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["data"]["pieces"] == 6 and record["data"]["self_written"] == 2
    assert record["init"] == {"method": "zero"}
    assert main([*args, "--data-samples", "0"]) == 2


def test_kl_loss_adapter_gradients_equal_the_plain_path(tiny_dir: Path, tmp_path: Path) -> None:
    """The chunked KL (frozen head) against autograd through full log-softmaxes, on a palettized student."""
    from graftlm.lora.config import LoraConfig
    from graftlm.lora.model import add_lora, lora_layers

    torch.manual_seed(0)
    teacher, _ = load_checkpoint(tiny_dir)
    student, _ = load_checkpoint(_student(tiny_dir, tmp_path / "s"))
    add_lora(student, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for _, layer in lora_layers(student):
            layer.lora_B.normal_(std=0.05)
    tokens = torch.randint(0, teacher.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    batch = collate(as_examples(tokens.tolist(), "t"), 0)

    def grads() -> list[torch.Tensor]:
        return [p.grad.clone() for p in student.parameters() if p.requires_grad]

    total, _ = kl_loss(teacher)(student, batch)
    total.backward()
    got = grads()
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(tokens)[:, :-1], -1)
    want = torch.nn.functional.kl_div(
        torch.log_softmax(student(tokens)[:, :-1], -1), t_logp, log_target=True, reduction="sum"
    )
    want.backward()
    assert torch.allclose(total, want, rtol=1e-4)
    for a, b in zip(got, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # float32 sums in another order
