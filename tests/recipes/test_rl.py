"""`graftlm rl` on the tiny model: samples through the engine, starts at KL 0, resumes exactly, stops cleanly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from graftlm.cli.main import main
from graftlm.errors import ConfigError
from graftlm.eval.rewards import Reward, RewardError
from graftlm.lora.config import LoraConfig
from graftlm.lora.peft_io import WEIGHTS_FILE, read_adapter
from graftlm.recipes.rl import RECORD_FILE, RLConfig, train_rl
from graftlm.train.sft import checkpoint_dir

REWARD_MODULE = '''
calls = {"n": 0, "fail_at": -1}

def vowels(prompt, output, **fields):
    """More vowels, more reward: something a tiny random model's samples differ in."""
    calls["n"] += 1
    if calls["n"] == calls["fail_at"]:
        raise ValueError("the scorer broke")
    return sum(c in "aeiou" for c in output) / max(1, len(output))
'''


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "rlreward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("rlreward", None)
    prompts = tmp_path / "prompts.jsonl"
    lines = ["Summarize this email.", "Proofread: teh cat.", "Meeting on Tuesday?", "The quick brown fox."]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    return prompts


def _config(**kw: object) -> RLConfig:
    base = {"k": 3, "batch": 2, "steps": 3, "max_new_tokens": 8, "lr": 1e-2, "save_every": 1}
    return RLConfig(**(base | kw))  # type: ignore[arg-type]


LORA = LoraConfig(r=4, alpha=8)


def test_a_run_learns_logs_and_writes_a_normal_adapter(tiny_dir: Path, setup: Path, tmp_path: Path) -> None:
    out = tmp_path / "rl"
    result = train_rl(str(tiny_dir), setup, Reward.parse("rlreward:vowels"), _config(), out, LORA)
    first = result.history[0]
    assert first["kl_ref_seq"] == 0.0 and first["kl_ref"] == 0.0  # from zero: the policy is the reference
    assert first["kl_base_seq"] == 0.0
    assert result.history[-1]["kl_ref_seq"] != 0.0  # the adapter moved
    assert all(k in first for k in ("reward", "pass_rate", "length", "tokens", "sample_seconds"))
    adapter = read_adapter(out)
    assert adapter.config.r == 4
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["reward"] == "rlreward:vowels" and record["metrics"]["steps"] == 3
    assert not checkpoint_dir(out).exists()


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_dir: Path, setup: Path, tmp_path: Path) -> None:
    import rlreward  # type: ignore[import-not-found]

    straight = tmp_path / "straight"
    train_rl(str(tiny_dir), setup, Reward.parse("rlreward:vowels"), _config(), straight, LORA, storage_dtype="float32")

    # the reward breaks in step 2: the run stops with the prompt named, the checkpoint after step 1 kept
    broken = tmp_path / "broken"
    rlreward.calls.update(n=0, fail_at=8)
    with pytest.raises(RewardError, match=r"the scorer broke.*prompt"):
        train_rl(
            str(tiny_dir), setup, Reward.parse("rlreward:vowels"), _config(), broken, LORA, storage_dtype="float32"
        )
    assert (checkpoint_dir(broken) / "state.json").is_file() and not broken.exists()
    assert json.loads((checkpoint_dir(broken) / "state.json").read_text())["step"] == 1
    rlreward.calls.update(fail_at=-1)
    train_rl(
        str(tiny_dir), setup, Reward.parse("rlreward:vowels"), _config(), broken, LORA, resume=True,
        storage_dtype="float32",
    )  # fmt: skip
    a, b = load_file(str(straight / WEIGHTS_FILE)), load_file(str(broken / WEIGHTS_FILE))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    history = [json.loads((p / RECORD_FILE).read_text())["history"] for p in (straight, broken)]
    assert [h["reward"] for h in history[0]] == [h["reward"] for h in history[1]]


def test_mdloo_from_an_sft_adapter_reports_kl_to_the_base(tiny_dir: Path, setup: Path, tmp_path: Path) -> None:
    start = tmp_path / "start"
    train_rl(str(tiny_dir), setup, Reward.parse("rlreward:vowels"), _config(steps=1), start, LORA)
    out = tmp_path / "md"
    result = train_rl(
        str(tiny_dir), setup, Reward.parse("rlreward:vowels"), _config(algo="mdloo", updates=2, steps=1), out,
        init_from=start,
    )  # fmt: skip
    first = result.history[0]
    assert first["kl_ref_seq"] == 0.0  # the reference is the starting adapter
    assert first["kl_base_seq"] != 0.0  # which is not the base
    assert read_adapter(out).config == read_adapter(start).config


def test_bad_settings_are_refused(tiny_dir: Path, setup: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        RLConfig(k=1)
    with pytest.raises(ConfigError, match="unknown reward"):
        Reward.parse("nonsense")
    with pytest.raises(ConfigError, match="cannot import"):
        Reward.parse("no_such_module_here:fn")
    assert (
        main(["rl", "--prompts", str(setup), "--reward", "instructions", "--out", str(tmp_path / "x"), "--k", "1"]) != 0
    )
