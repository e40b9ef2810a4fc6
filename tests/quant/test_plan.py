from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from graftlm.cli.main import main
from graftlm.eval.perplexity import text_chunks
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.quant.model import palettized_modules
from graftlm.quant.palettize import PalettizeConfig, PalettizeError, palettize
from graftlm.quant.plan import Option, allocate
from graftlm.quant.sensitivity import CalibrationError, Sensitivity, measure
from graftlm.recipes.tune import TUNE_SAMPLES, TUNE_STEPS
from tests.conftest import CORPUS


def synthetic_options(n: int = 40) -> tuple[dict[str, list[Option]], int]:
    g = torch.Generator().manual_seed(0)
    options, total = {}, 0
    for i in range(n):
        size = int(torch.randint(1_000, 50_000, (1,), generator=g))
        sens = float(torch.rand(1, generator=g)) * 10
        total += size
        options[f"w{i}"] = [
            Option(b, size * b + 16 * (1 << b), sens * size * 4.0**-b, 4.0**-b) for b in (2, 3, 4, 6, 8)
        ]
    return options, total


@pytest.mark.parametrize("target", [2.2, 2.5, 3.0, 3.5, 4.0, 5.25, 7.0])
def test_plans_hit_their_target_within_a_twentieth_of_a_bit(target: float) -> None:
    options, n = synthetic_options()
    plan = allocate(options, fixed_bits=1000, n_weights=n, target=target)
    assert target - 0.05 <= plan.bits_per_weight <= target


def test_the_plan_gives_sensitive_weights_more_bits() -> None:
    options, n = synthetic_options()
    plan = allocate(options, 0, n, 3.5)
    sens = {k: v[0].error / v[0].storage_bits for k, v in options.items()}  # error per bit at 2 bits
    bits = [plan.choice[k].bits for k in sorted(sens, key=sens.get)]
    assert sum(bits[-10:]) > sum(bits[:10])


def test_an_unreachable_target_is_refused() -> None:
    options, n = synthetic_options()
    with pytest.raises(ValueError, match="cannot reach 2"):
        allocate(options, fixed_bits=n, n_weights=n, target=2.0)  # the fixed tensors alone take 1 bit


def _sensitivity(model, tokenizer) -> Sensitivity:  # type: ignore[no-untyped-def]
    return measure(model, text_chunks(tokenizer, CORPUS * 3, 64), gram=True)


def test_palettize_reaches_its_target_counting_everything(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    plan, record = palettize(model, PalettizeConfig(bits=3.5), _sensitivity(model, tok))
    assert 3.45 <= plan.bits_per_weight <= 3.5
    # count again from what the model holds: packed indices, float16 tables, float32 norms
    held = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    assert sum(8 * t.nbytes for t in held) / model.num_parameters() == pytest.approx(plan.bits_per_weight)
    assert len({row["bits"] for row in record["plan"]}) > 1
    kept = [layer.in_scales is not None for _, layer in palettized_modules(model)]
    assert any(kept)  # input scales kept where they lowered the estimated loss (counted above)


def test_input_scales_are_kept_only_where_they_lower_the_loss(tiny_dir: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    sens = _sensitivity(model, tok)
    with_scales = palettize(model, PalettizeConfig(bits=4, choices=(4,)), sens)[0]
    model, _ = load_checkpoint(tiny_dir)
    without = palettize(model, PalettizeConfig(bits=4, choices=(4,), in_scale=False), sens)[0]
    assert not any(layer.in_scales is not None for _, layer in palettized_modules(model))
    for name, o in with_scales.choice.items():  # never worse than no scales: none is among the candidates
        assert o.error <= without.choice[name].error * (1 + 1e-6), name
    assert sum(o.error for o in with_scales.choice.values()) < sum(o.error for o in without.choice.values())


def test_a_mixed_plan_keeps_the_output_head_at_its_floor(tiny_dir: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    sens = _sensitivity(model, tok)
    floored = palettize(model, PalettizeConfig(bits=3.8, choices=(2, 3, 4, 6)), sens)[0]
    assert floored.choice["embed_tokens"].bits == 4  # the tied head: at least HEAD_FLOOR, the rest pays for it
    assert 3.75 <= floored.bits_per_weight <= 3.8
    model, _ = load_checkpoint(tiny_dir)
    higher = palettize(model, PalettizeConfig(bits=3.8, choices=(2, 3, 4, 6), head_bits=6), sens)[0]
    assert higher.choice["embed_tokens"].bits == 6
    assert 3.75 <= higher.bits_per_weight <= 3.8
    projections = [n for n in higher.choice if n != "embed_tokens"]
    assert sum(higher.choice[n].bits for n in projections) < sum(floored.choice[n].bits for n in projections)
    model, _ = load_checkpoint(tiny_dir)
    uniform = palettize(model, PalettizeConfig(bits=2, choices=(2,)), sens)[0]  # one width: no plan, no floor
    assert {o.bits for o in uniform.choice.values()} == {2}


def test_bad_requests_get_clear_errors(tiny_dir: Path) -> None:
    for bits in (1.5, 8.5):
        with pytest.raises(PalettizeError, match="between 2 and 8"):
            PalettizeConfig(bits=bits)
    with pytest.raises(PalettizeError, match="among"):
        PalettizeConfig(choices=(5,))
    with pytest.raises(PalettizeError, match="output head needs at least 4 bits"):
        PalettizeConfig(bits=2.5, choices=(2, 3))
    model, tok = load_checkpoint(tiny_dir)
    with pytest.raises(CalibrationError, match="too short"):
        measure(model, [tok.encode("a short text")])
    with pytest.raises(CalibrationError, match="needs calibration"):
        palettize(model, PalettizeConfig())
    palettize(model, PalettizeConfig(bits=4, choices=(4,), weighting="none", gptq=False))
    with pytest.raises(PalettizeError, match="already palettized"):
        palettize(model, PalettizeConfig(bits=4, choices=(4,), weighting="none", gptq=False))


def test_palettize_command_writes_a_model_every_command_loads(tiny_dir: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(CORPUS * 3))
    out = tmp_path / "pal"
    command = ["palettize", str(tiny_dir), "--out", str(out), "--calib", str(calib), "--calib-length", "64"]
    assert main([*command, "--calib-samples", "20"]) == 0
    layout = json.loads((out / "palettization.json").read_text())
    assert layout["calibration_tokens"] <= 20 * 64 and layout["calibration"].startswith("20 pieces of")
    assert abs(layout["bits_per_weight"] - 3.5) <= 0.05 and len(layout["plan"]) == len(layout["weights"])
    assert layout["tuning"]["steps"] == TUNE_STEPS  # tables and scales tuned by default
    assert layout["tuning"]["sequences"] == {"calibration": 20, "self-written": TUNE_SAMPLES}  # on more text
    measured = layout["measured_kl"]  # the plan's estimates scaled to KLs measured on 4 pieces by default
    assert set(measured["kl"]) == set(layout["weights"]) and measured["tokens"] == 4 * 64
    assert main(["generate", "-m", str(out), "--raw", "-n", "4", "The quick"]) == 0
    data = tmp_path / "train.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]} for w in "ab"]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines * 4))
    adapter = tmp_path / "adapter"
    train = ["train", "-m", str(out), "--data", str(data), "--out", str(adapter), "--rank", "4", "--epochs", "1"]
    assert main(train) == 0
    record = json.loads((adapter / "training.json").read_text())
    assert record["base_model"]["fingerprint"] == load_checkpoint(out)[0].fingerprint()  # the palettized base
    assert main(["generate", "-m", str(out), "--adapter", str(adapter), "--raw", "-n", "4", "Say a"]) == 0
    task = tmp_path / "task"
    assert (
        main([*train[:6], str(task), "--init-from", str(adapter), "--epochs", "1"]) == 0
    )  # as from a recovery adapter
    assert json.loads((task / "training.json").read_text())["init_from"]["path"] == str(adapter)
    assert main(["palettize", str(out), "--out", str(tmp_path / "again")]) == 2  # already palettized
    assert main(["palettize", str(tiny_dir), "--out", str(tmp_path / "x"), "--bits", "9"]) == 2
    assert main(["palettize", str(tiny_dir), "--out", str(tmp_path / "x"), "--tune-steps", "-1"]) == 2
    assert main(["palettize", str(tiny_dir), "--out", str(tmp_path / "x"), "--tune-samples", "-1"]) == 2
    assert main(["palettize", str(tiny_dir), "--out", str(tmp_path / "x"), "--calib-samples", "0"]) == 2
    assert main(["palettize", str(tiny_dir), "--out", str(tmp_path / "x"), "--kl-samples", "-1"]) == 2
