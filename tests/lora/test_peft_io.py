"""Adapter files: 16-bit storage, atomic writes, and refusal of broken or misfit adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import AdapterError, LoraConfig
from graftlm.lora.peft_io import WEIGHTS_FILE, apply_adapter, read_adapter, save_adapter
from tests.conftest import write_tiny_checkpoint
from tests.lora.helpers import random_adapter


@pytest.fixture(scope="module")
def saved(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    a = random_adapter(tiny_dir, LoraConfig(r=4, alpha=8), seed=0)
    path = tmp_path_factory.mktemp("adapters") / "summarize"
    save_adapter(path, a.config, a.tensors, a.base_fingerprint or "")
    return path


def test_weights_are_stored_in_16_bits_and_read_in_32(saved: Path) -> None:
    with safe_open(str(saved / WEIGHTS_FILE), "pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert {t.dtype for t in read_adapter(saved).tensors.values()} == {torch.float32}


def test_overwrite_is_atomic(saved: Path, tiny_dir: Path) -> None:
    a = read_adapter(saved)
    bad = dict(a.tensors)
    bad["x"] = "not a tensor"  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        save_adapter(saved, a.config, bad, "f")
    assert read_adapter(saved).tensors.keys() == a.tensors.keys()  # the old version is intact
    assert sorted(p.name for p in saved.parent.iterdir()) == ["summarize"]  # no temp folders left


def _copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "broken"
    dst.mkdir()
    for f in saved.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_weights_are_refused(saved: Path, tmp_path: Path) -> None:
    bad = _copy(saved, tmp_path)
    data = (bad / WEIGHTS_FILE).read_bytes()
    (bad / WEIGHTS_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        read_adapter(bad)


def test_malformed_config_is_refused(saved: Path, tmp_path: Path) -> None:
    bad = _copy(saved, tmp_path)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        read_adapter(bad)


def test_missing_file_is_named(saved: Path, tmp_path: Path) -> None:
    bad = _copy(saved, tmp_path)
    (bad / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match=r"missing adapter_model\.safetensors"):
        read_adapter(bad)


def test_unknown_adapter_type_is_refused(saved: Path, tmp_path: Path) -> None:
    bad = _copy(saved, tmp_path)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="'IA3'"):
        read_adapter(bad)


def test_adapter_whose_shapes_do_not_fit_is_refused_by_name(saved: Path, tmp_path: Path) -> None:
    wide = write_tiny_checkpoint(tmp_path / "wide", intermediate_size=96)
    model, _ = load_checkpoint(wide)
    with pytest.raises(AdapterError, match=r"mlp\.(gate|up|down)_proj\.lora_[AB]\.weight has shape"):
        apply_adapter(model, read_adapter(saved), force=True)


def test_adapter_for_more_layers_is_refused(saved: Path, tmp_path: Path) -> None:
    short = write_tiny_checkpoint(tmp_path / "short", num_hidden_layers=1)
    model, _ = load_checkpoint(short)
    with pytest.raises(AdapterError, match="layer 1, the base has 1 layers"):
        apply_adapter(model, read_adapter(saved), force=True)


def test_bad_lora_settings_are_refused() -> None:
    for bad in ({"r": 0}, {"dropout": 1.0}, {"targets": ("qkv",)}, {"layers": (-1,)}):
        with pytest.raises(AdapterError):
            LoraConfig(**bad)  # type: ignore[arg-type]


def test_a_negative_dimension_is_refused(saved: Path, tmp_path: Path) -> None:
    bad = _copy(saved, tmp_path)
    data = (bad / WEIGHTS_FILE).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["shape"] = [-d for d in header[first]["shape"]]  # the same element count, as a product
    new = json.dumps(header).encode()
    (bad / WEIGHTS_FILE).write_bytes(len(new).to_bytes(8, "little") + new + data[8 + n :])
    with pytest.raises(AdapterError, match="negative dimension") as e:
        read_adapter(bad)
    assert e.value.public == "its adapter_model.safetensors is truncated or corrupt"


def test_nan_or_infinite_weights_are_refused(saved: Path, tmp_path: Path) -> None:
    a = read_adapter(saved)
    for value in (float("nan"), float("inf"), float("-inf")):
        tensors = {k: t.clone() for k, t in a.tensors.items()}
        tensors[sorted(tensors)[-1]][0, -1] = value
        for dtype in ("bfloat16", "float16", "float32"):
            save_adapter(tmp_path / "bad", a.config, tensors, "f", dtype=dtype)
            with pytest.raises(AdapterError, match="NaN or infinite"):
                read_adapter(tmp_path / "bad")
    for dtype in ("bfloat16", "float16", "float32"):  # the largest finite values pass
        tensors = {k: t.clone() for k, t in a.tensors.items()}
        tensors[sorted(tensors)[0]][0, 0] = -torch.finfo(getattr(torch, dtype)).max
        save_adapter(tmp_path / "big", a.config, tensors, "f", dtype=dtype)
        read_adapter(tmp_path / "big")


def test_a_config_nested_too_deep_or_holding_values_gives_a_safe_reason(saved: Path, tmp_path: Path) -> None:
    bad = _copy(saved, tmp_path)
    (bad / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterError, match=r"adapter_config\.json") as e:
        read_adapter(bad)
    assert e.value.public == "its adapter_config.json is not a LoRA config"
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "SECRET", "r": 4}))
    with pytest.raises(AdapterError, match="SECRET") as e:  # the operator's message names it...
        read_adapter(bad)
    assert e.value.public is not None and "SECRET" not in e.value.public  # ...the client's does not


def test_rank_patterns_run_in_linear_time_or_are_refused() -> None:
    import time

    evil = LoraConfig(rank_pattern={"(a+)+$": 4, "(x|x)*y": 8})  # Python's re backtracks for ages on these
    t0 = time.perf_counter()
    assert evil.rank_alpha("model.layers.0." + "a" * 40 + "!") == (16, 32.0)
    assert evil.rank_alpha("x" * 60) == (16, 32.0)
    assert time.perf_counter() - t0 < 0.1
    for bad in ({"(a)\\1": 4}, {"(?=q)q_proj": 4}, {"q_proj": 0}, {"q_proj": "8"}, {"x" * 600: 4}):
        with pytest.raises(AdapterError):
            LoraConfig(rank_pattern=bad)
    # PEFT's matching rule: the key matches the end of the module path, after a dot
    c = LoraConfig(rank_pattern={"q_proj": 4, r"layers\.1\..*": 8}, alpha_pattern={"v_proj": 2.0})
    assert c.rank_alpha("model.layers.0.self_attn.q_proj") == (4, 32.0)
    assert c.rank_alpha("model.layers.1.mlp.up_proj") == (8, 32.0)
    assert c.rank_alpha("model.layers.0.self_attn.v_proj") == (16, 2.0)
    assert c.rank_alpha("model.layers.0.self_attn.xq_proj") == (16, 32.0)
