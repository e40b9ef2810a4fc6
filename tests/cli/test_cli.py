"""The command line, run in-process and as a subprocess, on the tiny model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graftlm.cli.main import main
from graftlm.model import linear
from graftlm.native import FasterPath


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "chat", "info", "demo"):
        assert cmd in out


def test_generate_raw_and_batched(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "-m", str(tiny_dir), "--raw", "-n", "8", "The quick brown"]) == 0
    single = capsys.readouterr().out.strip()
    assert single
    assert main(["generate", "-m", str(tiny_dir), "--raw", "-n", "8", "The quick brown", "Hi"]) == 0
    batched = capsys.readouterr().out
    assert "### The quick brown" in batched and "### Hi" in batched
    assert single in batched  # batching does not change the answer


def test_info_json(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tiny_dir), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["layers"] == 2 and facts["kv_heads"] == 2 and facts["checkpoint"] == str(tiny_dir)
    assert facts["parameters"] > 0


def test_unknown_model_lists_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "smollm2-135m-instruct" in err


def test_unsupported_architecture_is_named(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "gpt2ish"
    bad.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["info", str(bad)]) == 2
    assert "GPTNeoXForCausalLM" in capsys.readouterr().err


def test_prompt_too_long_is_a_clear_error(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long = "The quick brown fox jumps over the lazy dog. " * 40
    assert main(["generate", "-m", str(tiny_dir), "--raw", long]) == 2
    assert "context window is 128" in capsys.readouterr().err


def test_bad_sampling_option_is_a_clear_error(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "-m", str(tiny_dir), "--top-p", "0", "hi"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_a_bad_kernel_setting_is_a_clear_error(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(linear, "paths", FasterPath("gemv"))  # a fresh one reads the setting again
    monkeypatch.setenv("GRAFTLM_KERNEL", "fast")
    assert main(["generate", "-m", str(tiny_dir), "--raw", "-n", "2", "Hi"]) == 2
    assert "GRAFTLM_KERNEL must be auto, always or never, not 'fast'" in capsys.readouterr().err


def test_chat_keeps_the_conversation(tiny_dir: Path) -> None:
    # A real terminal session: two turns, a reset, then Ctrl-D.
    proc = subprocess.run(
        [sys.executable, "-m", "graftlm.cli.main", "chat", "-m", str(tiny_dir), "-n", "6"],
        input="hello\nhow are you\n/reset\nagain\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("bot>") == 3
    assert "conversation cleared" in proc.stdout
    contexts = [int(x) for x in re.findall(r"context (\d+) tokens", proc.stdout)]
    assert contexts[1] > contexts[0] + 6  # the second turn carries the first exchange
    assert contexts[2] < contexts[1]  # /reset forgot it


def test_chat_drops_the_oldest_turns_to_fit(tiny_dir: Path) -> None:
    from graftlm.cli.chat import fit
    from graftlm.engine.generate import Generator
    from graftlm.errors import GraftlmError
    from graftlm.loading.checkpoint import load_checkpoint

    gen = Generator(*load_checkpoint(tiny_dir))
    turn = "The quick brown fox jumps over the lazy dog."
    messages = [{"role": "system", "content": "Be brief."}]
    for _ in range(6):
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": turn}]
    messages.append({"role": "user", "content": "last question"})
    ids = fit(gen, messages, room=32)
    assert len(ids) + 32 <= gen.context_window
    assert messages[0]["role"] == "system" and messages[-1]["content"] == "last question"
    assert len(messages) < 14
    with pytest.raises(GraftlmError, match="leaves no room"):
        fit(gen, [{"role": "user", "content": turn * 20}], room=32)


def write_say(data: Path, repeats: int) -> None:
    """Chat lines that teach one-word answers ("Say apple" -> "apple"), each word `repeats` times."""
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
        for w in ["apple", "sky", "grass", "night"] * repeats
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_train_writes_a_peft_adapter_with_its_record(tiny_dir: Path, tmp_path: Path) -> None:
    from graftlm.loading.checkpoint import load_checkpoint
    from graftlm.lora.peft_io import read_adapter

    data = tmp_path / "train.jsonl"
    write_say(data, 3)
    out = tmp_path / "adapters" / "say"
    args = [
        "train",
        "-m",
        str(tiny_dir),
        "--data",
        str(data),
        "--valid",
        str(data),
        "--out",
        str(out),
        "--rank",
        "4",
        "--targets",
        "q_proj,v_proj",
        "--layers",
        "1",
        "--epochs",
        "4",
        "--batch",
        "4",
        "--lr",
        "3e-3",
        "--save-every",
        "1",
    ]
    assert main(args) == 0
    record = json.loads((out / "training.json").read_text())
    model, _ = load_checkpoint(tiny_dir)
    assert record["base_model"]["fingerprint"] == model.fingerprint()
    from graftlm.train.data import load_examples
    from graftlm.train.trainer import evaluate_loss

    base_loss = evaluate_loss(model, load_examples(data, load_checkpoint(tiny_dir)[1], 512), 4, 0)
    assert record["metrics"]["steps"] == 12 and record["metrics"]["valid_loss"] < base_loss
    assert len(record["data"]["train"]["sha256"]) == 64
    adapter = read_adapter(out)
    assert adapter.modules() == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert not (tmp_path / "adapters" / ".say.checkpoint").exists()  # removed once the adapter is written


def test_train_reports_a_bad_line(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert main(["train", "-m", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "a")]) == 2
    assert "train.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_generate_with_an_adapter_answers_as_the_merged_model(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from graftlm.engine.generate import Generator
    from graftlm.engine.sampling import SamplingParams
    from graftlm.loading.merged import load_merged
    from graftlm.lora.config import LoraConfig
    from graftlm.lora.peft_io import save_adapter
    from tests.lora.helpers import random_adapter

    a = random_adapter(tiny_dir, LoraConfig(r=4, alpha=8), seed=1)
    save_adapter(tmp_path / "a", a.config, a.tensors, a.base_fingerprint or "")
    assert main(["generate", "-m", str(tiny_dir), "--adapter", str(tmp_path / "a"), "--raw", "-n", "8", "Hi"]) == 0
    printed = capsys.readouterr().out.strip()
    model, tok, _ = load_merged(str(tiny_dir), tmp_path / "a")
    want = Generator(model, tok).generate([tok.encode("Hi")], SamplingParams(max_new_tokens=8))[0].text
    assert printed == want.strip()
    base, _ = load_merged(str(tiny_dir), None)[:2]
    assert not torch.equal(base.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight)


def test_a_long_command_logs_its_progress_when_its_output_is_a_file(tiny_dir: Path, tmp_path: Path) -> None:
    """`graftlm train > log 2>&1`, as nohup or a job runner runs it: the log shows step, loss, speed,
    elapsed and time left as it goes (every GRAFTLM_PROGRESS_SECONDS), not only the end."""
    import os
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}:", "completion": f" {i}"}) + "\n" for i in range(40)))
    log = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "graftlm.cli.main", "train", "-m", str(tiny_dir), "--data", str(data)]
    cmd += ["--out", str(tmp_path / "a"), "--batch", "4", "--epochs", "2", "--rank", "2"]
    env = os.environ | {"GRAFTLM_PROGRESS_SECONDS": "0", "COLUMNS": "200"}
    with log.open("w") as out:
        assert subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300).returncode == 0
    lines = [x.split(" INFO ", 1)[1] for x in log.read_text().splitlines() if " INFO training: " in x]
    assert len(lines) >= 10, log.read_text()
    assert lines[0].startswith("training: 0/20 steps")  # the start, then every step (the interval is 0 here)
    assert "training: 1/20 steps, loss " in lines[1] and "tok/s" in lines[1] and "left" in lines[1]
    assert lines[-1].startswith("training: 20/20 steps") and "elapsed" in lines[-1]
    assert "max length auto" in log.read_text() and "peak memory" in log.read_text()


MODEL_COMMANDS = [
    ["train"],
    ["eval"],
    ["rl"],
    ["synth"],
    ["recover"],
    ["palettize"],
    ["generate"],
    ["chat"],
    ["serve"],
    ["pipeline", "run"],
    ["pipeline", "worker"],
]


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=" ".join)
def test_every_command_that_runs_the_model_takes_a_device(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    help_text = capsys.readouterr().out
    assert "--device" in help_text
    assert command == ["palettize"] or "--dtype" in help_text  # palettize fits tables to float32 weights


def test_a_device_torch_cannot_use_is_refused_before_anything_runs(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n')
    train = ["train", "-m", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "a")]
    assert main([*train, "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*train, "--device", "cuda"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_training_on_a_bfloat16_base_keeps_a_float32_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    from graftlm.lora.peft_io import read_adapter

    data = tmp_path / "train.jsonl"
    write_say(data, 2)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        args = ["train", "-m", str(tiny_dir), "--data", str(data), "--valid", str(data), "--out", str(out)]
        assert main([*args, "--dtype", dtype, "--max-steps", "3", "--storage-dtype", "float32", "--lr", "3e-3"]) == 0
        losses[dtype] = json.loads((out / "training.json").read_text())["metrics"]["valid_loss"]
        assert all(t.dtype == torch.float32 for t in read_adapter(out).tensors.values())
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.03)


def test_ray_options_without_ray_are_refused(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "-m", str(tiny_dir), "--replicas", "2"]) == 2
    assert "--replicas and --address are for --ray" in capsys.readouterr().err
    assert main(["pipeline", "run", "--spec", "missing.toml", "--address", "auto"]) == 2
    assert "--address is for --executor ray" in capsys.readouterr().err
