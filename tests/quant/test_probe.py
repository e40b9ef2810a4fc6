from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graftlm.eval.perplexity import text_chunks
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.model.llama import Llama
from graftlm.quant.model import palettized_modules
from graftlm.quant.palettize import PalettizeConfig, _calibrate, palettize
from graftlm.quant.plan import Option
from graftlm.quant.probe import KLProbe
from graftlm.quant.sensitivity import measure
from tests.conftest import CORPUS, write_tiny_checkpoint


def full_forward_kl(model: Llama, name: str, weight: torch.Tensor, sequences: list[list[int]]) -> float:
    """The reference: a copy of the whole model with the weight replaced, run from the tokens."""
    changed = copy.deepcopy(model)
    changed.get_submodule(name).weight.data = weight.clone()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for s in sequences:
            ids = torch.tensor([s])
            ref, out = F.log_softmax(model(ids)[0], -1), F.log_softmax(changed(ids)[0], -1)
            total += float((ref.exp() * (ref - out)).sum())
            tokens += len(s)
    return total / tokens


@pytest.mark.parametrize("tied", [True, False])
def test_the_probe_measures_what_a_whole_forward_pass_with_the_weight_replaced_gives(
    tmp_path: Path, tied: bool
) -> None:
    model, tok = load_checkpoint(write_tiny_checkpoint(tmp_path / "m", tie_word_embeddings=tied))
    sequences = text_chunks(tok, CORPUS, 24)[:3]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = KLProbe(model, sequences)
    g = torch.Generator().manual_seed(0)
    names = ["layers.0.self_attn.k_proj", "layers.1.mlp.down_proj", "embed_tokens"] + ([] if tied else ["lm_head"])
    for name in names:
        w = model.get_submodule(name).weight
        noisy = w.detach() + 0.1 * torch.randn(w.shape, generator=g)
        measured = probe.kl(name, noisy)
        assert measured > 1e-4, name
        assert measured == pytest.approx(full_forward_kl(model, name, noisy, sequences), rel=1e-4, abs=1e-7), name
        assert probe.kl(name, w.detach().clone()) == pytest.approx(0.0, abs=1e-6), name
    for n, p in model.named_parameters():  # every weight put back
        assert torch.equal(p, before[n]), n
    with pytest.raises(ValueError, match="not"):
        probe.kl("layers.0.self_attn.k_proj", torch.zeros(3, 3))


def test_a_probed_plan_compares_measured_kls(tiny_dir: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    sens = measure(model, text_chunks(tok, CORPUS * 3, 64), gram=True)
    sequences = text_chunks(tok, CORPUS, 64)[:2]
    reference = copy.deepcopy(model)
    plan, record = palettize(model, PalettizeConfig(bits=3.5), sens, probe=KLProbe(model, sequences))
    measured = record["measured_kl"]["kl"]
    assert set(measured) == set(plan.choice)
    assert {m["bits"] for n, m in measured.items() if n != "embed_tokens"} == {3}  # the width nearest 3.5 (the lower)
    assert measured["embed_tokens"]["bits"] == 4  # the head's floor
    layers = dict(palettized_modules(model))
    # where the plan chose the measured width, its loss is the KL of the palette it holds
    at_measured = [n for n, o in plan.choice.items() if o.bits == measured[n]["bits"]]
    assert at_measured
    for name in at_measured:
        error = plan.choice[name].error
        assert error == pytest.approx(measured[name]["kl"], rel=1e-6)
        kl = full_forward_kl(reference, name, layers[name].dense_weight(), sequences)
        assert error == pytest.approx(kl, rel=1e-3)
    assert 3.45 <= plan.bits_per_weight <= 3.5


def test_calibration_puts_every_weight_in_one_unit() -> None:
    options = {
        "a": [Option(2, 10, 8.0, 0.1), Option(4, 20, 2.0, 0.01)],
        "b": [Option(2, 10, 6.0, 0.1), Option(4, 20, 3.0, 0.01)],
        "c": [Option(2, 10, 1.0, 0.1), Option(4, 20, 0.0, 0.0)],  # lossless at the measured width: no ratio
    }
    scaled = _calibrate(options, {"a": (4, 1.0), "b": (4, 6.0), "c": (4, 0.0)})
    assert [o.error for o in scaled["a"]] == [4.0, 1.0]  # ratio 0.5
    assert [o.error for o in scaled["b"]] == [12.0, 6.0]  # ratio 2
    assert [o.error for o in scaled["c"]] == [0.5, 0.0]  # the median of the others (torch's: the lower, 0.5)
