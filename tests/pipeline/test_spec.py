"""Reading adapters.toml: defaults, templates, parents first, and clear errors before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graftlm.pipeline.spec import Gate, SpecError, load_spec


def task_folder(folder: Path, metric: str = "exact_match") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"prompt": "q", "completion": "a"}) + "\n"
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(line)
    (folder / "task.json").write_text(json.dumps({"metric": metric, "max_new_tokens": 12}))
    return folder


def write_spec(root: Path, body: str) -> Path:
    (root / "adapters.toml").write_text(body)
    return root / "adapters.toml"


def test_spec_defaults_templates_and_order(tmp_path: Path) -> None:
    task_folder(tmp_path / "data" / "sum")
    for user in ("ann", "bob"):
        task_folder(tmp_path / "users" / user / "mail", "rouge_l")
    (tmp_path / "users" / "not-a-user.txt").write_text("")
    path = write_spec(
        tmp_path,
        """
base = "tiny"
[defaults.train]
lr = 1e-3
epochs = 2
[defaults.gate]
beat_base_by = 0.05
[[adapter]]
name = "sum"
data = "data/sum"
init_from = "recovery@prod"
train = { epochs = 3 }
gate = { min_score = 0.5 }
[[adapter]]
name = "recovery"
data = "data/sum"
gate = { beat_prod_by = 0.01 }
[[template]]
name = "reply-{user}"
data = "users/{user}/mail"
""",
    )
    spec = load_spec(path)
    assert [a.name for a in spec.adapters] == ["sum", "recovery", "reply-ann", "reply-bob"]
    order = [a.name for a in spec.ordered()]
    assert order.index("recovery") < order.index("sum")  # the parent first
    s = spec.adapter("sum")
    assert s.train == {"lr": 1e-3, "epochs": 3} and s.metric == "exact_match" and s.max_new_tokens == 12
    assert s.gate == Gate(min_score=0.5, beat_base_by=0.05, beat_prod_by=0.0)
    assert s.parent_name() == "recovery"
    assert spec.adapter("reply-bob").metric == "rouge_l"
    assert spec.adapter("reply-bob").test_file == tmp_path / "users" / "bob" / "mail" / "test.jsonl"
    assert spec.registry == tmp_path / "registry"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('name = "a"\ndata = "data/missing"', "no training data"),
        ('name = "a"\ntrain_file = "nope.jsonl"\ntest_file = "data/t/test.jsonl"', r"nope\.jsonl does not exist"),
        ('name = "a"\ndata = "data/t"\nmetric = "bleu"', "unknown metric 'bleu'"),
        ('name = "a"\ndata = "data/t"\ngate = { min_score = 1.5 }', "can never be met"),
        ('name = "a"\ndata = "data/t"\ngate = { beat_base_by = 1.0 }', "impossible"),
        ('name = "a"\ndata = "data/t"\ngate = { beat_everyone = 1 }', "unknown setting 'beat_everyone'"),
        ('name = "a"\ndata = "data/t"\ntrain = { lr = "fast" }', "lr must be float"),
        ('name = "a"\ndata = "data/t"\ntrain = { learning_rate = 1 }', "unknown setting 'learning_rate'"),
        ('name = "a b"\ndata = "data/t"', "needs a `name`"),
        ('name = "a"\ndata = "data/t"\nextra = 1', "unknown keys extra"),
        (
            'name = "a"\ndata = "data/t"\ninit_from = "a"\n[[adapter]]\nname = "b"\ndata = "data/t"\ninit_from = "a"',
            None,
        ),
        (
            'name = "a"\ndata = "data/t"\ninit_from = "b"\n[[adapter]]\nname = "b"\ndata = "data/t"\ninit_from = "a"',
            "cycle",
        ),
        ('name = "a"\ndata = "data/t"\n[[adapter]]\nname = "a"\ndata = "data/t"', "listed twice"),
    ],
)
def test_bad_specs_fail_before_training(tmp_path: Path, entry: str, message: str | None) -> None:
    task_folder(tmp_path / "data" / "t")
    path = write_spec(tmp_path, f'base = "tiny"\n[[adapter]]\n{entry}\n')
    if message is None:  # a self-parent is a cycle too
        with pytest.raises(SpecError, match="cycle"):
            load_spec(path)
        return
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def test_spec_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no spec file"):
        load_spec(tmp_path / "adapters.toml")
    with pytest.raises(SpecError, match=r"adapters\.toml"):
        load_spec(write_spec(tmp_path, "base = \n"))
    with pytest.raises(SpecError, match="lists no"):
        load_spec(write_spec(tmp_path, 'base = "tiny"\n'))
    with pytest.raises(SpecError, match="base model"):
        load_spec(write_spec(tmp_path, 'base = "./missing-model"\n[[adapter]]\nname = "a"\n'))
    with pytest.raises(SpecError, match="matches no folder"):
        (tmp_path / "users").mkdir()
        load_spec(write_spec(tmp_path, '[[template]]\nname = "r-{user}"\ndata = "users/{user}"\n'))


def test_gate_reasons() -> None:
    gate = Gate(min_score=0.3, beat_base_by=0.05, beat_prod_by=0.0)
    ok, why = gate.check(0.5, base=0.4, prod=0.45)
    assert ok and why == ["0.5000 >= 0.3000 (the floor)", "0.5000 >= 0.4500 (base 0.4000 +0.0500)",
                          "0.5000 >= 0.4500 (prod 0.4500 +0.0000)"]  # fmt: skip
    ok, why = gate.check(0.44, base=0.4, prod=None)
    assert not ok and why[0] == "no prod version to compare with" and "0.4400 < 0.4500" in why[2]
