"""End to end on the tiny model: spec -> run -> registry -> a running server, then change data, swap
the base, fail a gate, and run twice at once."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import openai
import pytest

from graftlm.cli.main import main
from graftlm.engine.engine import Engine, EngineConfig
from graftlm.engine.registry_finder import RegistryFinder
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.pipeline.run import Pipeline, PipelineBusyError, run_lock
from graftlm.pipeline.spec import load_spec
from graftlm.pipeline.worker import DataWatcher, Worker, queue_of, targets_for_path
from graftlm.registry import Registry
from tests.conftest import write_tiny_checkpoint
from tests.server.helpers import serving

SPEC = """
base = "{base}"
[defaults.train]
rank = 4
lr = 0.01
epochs = 30
batch = 8
max_length = 64
[defaults.gate]
beat_base_by = 0.5
[[adapter]]
name = "alpha"
data = "data/alpha"
[[adapter]]
name = "beta"
data = "data/beta"
"""


def write_task(root: Path, name: str, answer: str, folder: Path | None = None) -> None:
    d = folder or root / "data" / name
    d.mkdir(parents=True, exist_ok=True)
    ask = "Item {}: the quick brown fox"
    rows = [
        {"messages": [{"role": "user", "content": ask.format(i)}, {"role": "assistant", "content": answer}]}
        for i in range(24)
    ]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (d / "task.json").write_text(json.dumps({"metric": "exact_match", "max_new_tokens": 12}))


@pytest.fixture
def workspace(tmp_path: Path, tiny_dir: Path) -> Path:
    write_task(tmp_path, "alpha", "the cat sat")
    write_task(tmp_path, "beta", "Meeting on Tuesday")
    (tmp_path / "adapters.toml").write_text(SPEC.format(base=tiny_dir))
    return tmp_path


def chat(client: openai.OpenAI, model: str) -> str:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Item 3: the quick brown fox"}], max_tokens=12, temperature=0
    )
    return r.choices[0].message.content or ""


def versions(reg: Registry) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for v in reg.versions():
        out.setdefault(v.name, []).append(v.version)
    return out


def test_pipeline_retrains_exactly_what_changed_and_the_server_follows(workspace: Path, tiny_dir: Path) -> None:
    spec = load_spec(workspace / "adapters.toml")
    first = Pipeline(spec).run()
    assert [(o.name, o.action, o.passed, o.prod_after) for o in first] == [
        ("alpha", "trained", True, 1),
        ("beta", "trained", True, 1),
    ]
    assert first[0].score == 1.0 and first[0].base_score == 0.0 and first[0].reasons == ["no version yet"]
    again = Pipeline(spec).run()
    assert [o.action for o in again] == ["fresh", "fresh"]  # nothing changed, nothing runs
    reg = Registry(spec.registry)
    assert versions(reg) == {"alpha": [1], "beta": [1]}
    v = reg.resolve("beta")
    assert v.lineage["pipeline"]["inputs"]["base"] == v.lineage["base_fingerprint"]
    assert (
        v.metrics["gate"]["passed"]
        and v.lineage["data"]["train"]["sha256"] == v.lineage["pipeline"]["inputs"]["data"]["train"]
    )

    model, tok = load_checkpoint(tiny_dir)
    engine = Engine(model, tok, EngineConfig(max_batch=4, max_len=128), RegistryFinder(reg)).start()
    with serving(engine, "tiny") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)
        assert chat(client, "beta") == "Meeting on Tuesday"
        assert chat(client, "beta@prod") == "Meeting on Tuesday" == chat(client, "beta@1")
        assert {m.id for m in client.models.list().data} >= {"tiny", "alpha", "beta", "beta@prod"}
        with pytest.raises(openai.NotFoundError, match="no alias 'canary'"):
            chat(client, "beta@canary")

        # requests keep flowing while the pipeline retrains beta and moves prod
        answers: list[str] = []
        errors: list[Exception] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    answers.append(chat(client, "beta"))
                except Exception as e:
                    errors.append(e)

        thread = threading.Thread(target=traffic)
        thread.start()
        write_task(workspace, "beta", "Numbers like 12345")
        third = Pipeline(spec).run()
        stop.set()
        thread.join(60)
        assert [(o.name, o.action) for o in third] == [("alpha", "fresh"), ("beta", "trained")]
        assert third[1].reasons == ["data changed (test, train)"] and third[1].prod_after == 2
        assert chat(client, "beta") == "Numbers like 12345"  # the new prod, without a restart
        assert chat(client, "beta@1") == "Meeting on Tuesday" and chat(client, "alpha") == "the cat sat"
        assert not errors and set(answers) <= {"Meeting on Tuesday", "Numbers like 12345"}
    assert versions(reg) == {"alpha": [1], "beta": [1, 2]}

    # a gate that fails: prod stays where it was
    (workspace / "adapters.toml").write_text(
        SPEC.format(base=tiny_dir).replace('data = "data/alpha"', 'data = "data/alpha"\ntrain = { max_steps = 1 }')
    )
    spec = load_spec(workspace / "adapters.toml")
    failed = Pipeline(spec).run()
    assert failed[0].action == "trained" and failed[0].reasons == ["settings changed (train)"]
    assert failed[0].passed is False and failed[0].prod_after == 1 and reg.resolve("alpha").version == 1
    assert reg.resolve("alpha@2").metrics["gate"]["passed"] is False
    assert failed[1].action == "fresh"
    assert [o.action for o in Pipeline(spec).run()] == ["fresh", "fresh"]  # a failed gate is not retried

    # a new base model: every adapter retrained; the old prod does not fit it, so only the base is beaten
    write_tiny_checkpoint(workspace / "other-base", seed=5)
    (workspace / "adapters.toml").write_text(SPEC.format(base=workspace / "other-base"))
    spec = load_spec(workspace / "adapters.toml")
    swapped = Pipeline(spec).run()
    assert all(o.action == "trained" and "base model changed" in o.reasons for o in swapped)
    assert all(o.prod_score is None and o.passed for o in swapped)
    assert reg.resolve("alpha").lineage["base_fingerprint"] != reg.resolve("alpha@1").lineage["base_fingerprint"]


def test_one_failure_does_not_stop_the_others(workspace: Path) -> None:
    (workspace / "data" / "alpha" / "train.jsonl").write_text('{"broken": \n')
    outcomes = Pipeline(load_spec(workspace / "adapters.toml")).run()
    assert outcomes[0].action == "failed" and "train.jsonl:1" in outcomes[0].error
    assert outcomes[1].action == "trained" and outcomes[1].passed


def test_two_runs_at_once_wait_or_refuse(workspace: Path) -> None:
    spec = load_spec(workspace / "adapters.toml")
    with run_lock(spec.state):
        with pytest.raises(PipelineBusyError, match="another pipeline run holds"):
            Pipeline(spec).run(wait=False)
        results: list = []
        waiter = threading.Thread(target=lambda: results.append(Pipeline(spec).run()))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not results  # waits for the lock
    waiter.join(120)
    assert [o.action for o in results[0]] == ["trained", "trained"]


def test_notify_and_worker(workspace: Path) -> None:
    spec = load_spec(workspace / "adapters.toml")
    assert targets_for_path(spec, workspace / "data" / "beta") == ["beta"]
    assert targets_for_path(spec, workspace / "data" / "alpha" / "train.jsonl") == ["alpha"]
    queue = queue_of(spec)
    job = queue.push("beta", "data changed")
    worker = Worker(workspace / "adapters.toml", lease_s=30, backoff_s=0.01)
    assert worker.run(once=True) == 1
    done = queue.get(job)
    assert done.state == "done" and [r["name"] for r in done.result] == ["beta"]
    assert done.result[0]["action"] == "trained"
    assert versions(Registry(spec.registry)) == {"beta": [1]}


def test_watch_turns_data_changes_into_jobs(workspace: Path, tiny_dir: Path) -> None:
    spec_path = workspace / "adapters.toml"
    users = workspace / "users"
    write_task(users, "ann", "hi ann", users / "ann")
    spec_path.write_text(spec_path.read_text() + '[[template]]\nname = "reply-{user}"\ndata = "users/{user}"\n')
    watcher = DataWatcher(spec_path)
    assert watcher.poll() == []
    write_task(workspace, "beta", "something new")
    assert watcher.poll() == ["beta"]
    write_task(users, "bob", "hi bob", users / "bob")
    assert watcher.poll() == ["reply-bob"]  # a new user's folder: a new personal adapter
    assert watcher.poll() == []


def test_pipeline_cli(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(workspace / "adapters.toml")
    assert main(["pipeline", "status", "--spec", spec]) == 0
    assert "no version yet" in capsys.readouterr().out
    assert main(["pipeline", "run", "--spec", spec, "--only", "beta", "--json", str(workspace / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "beta trained  version 1  score 1.0000 (base 0.0000, no prod)" in out and "gate passed" in out
    assert json.loads((workspace / "r.json").read_text())[0]["prod_after"] == 1
    assert main(["pipeline", "notify", "--spec", spec, "--path", str(workspace / "data" / "alpha")]) == 0
    assert "queued job 1: alpha" in capsys.readouterr().out
    assert main(["pipeline", "worker", "--spec", spec, "--once"]) == 0
    assert main(["pipeline", "jobs", "--spec", spec]) == 0
    assert "done" in capsys.readouterr().out
    registry = ["--registry", str(workspace / "registry")]
    assert main(["registry", "list", *registry]) == 0
    assert main(["registry", "verify", *registry]) == 0
    assert "2 versions checked: all good" in capsys.readouterr().out
    assert main(["pipeline", "notify", "--spec", spec, "--adapter", "nope"]) == 2
    assert "no adapter 'nope'" in capsys.readouterr().err
    (workspace / "bad.toml").write_text('[[adapter]]\nname = "a"\ndata = "data/alpha"\nmetric = "bleu"\n')
    assert main(["pipeline", "run", "--spec", str(workspace / "bad.toml")]) == 2
    assert "unknown metric 'bleu'" in capsys.readouterr().err
    assert main(["serve", "--registry", str(workspace / "missing")]) == 2
    assert "no registry at" in capsys.readouterr().err


def test_a_child_starts_from_its_parent_and_follows_it(workspace: Path, tiny_dir: Path) -> None:
    spec_path = workspace / "adapters.toml"
    spec_path.write_text(
        spec_path.read_text().replace('data = "data/beta"', 'data = "data/beta"\ninit_from = "alpha@prod"')
    )
    spec = load_spec(spec_path)
    first = Pipeline(spec).run()
    assert [o.action for o in first] == ["trained", "trained"]
    reg = Registry(spec.registry)
    beta = reg.resolve("beta")
    assert beta.lineage["pipeline"]["inputs"]["parent"]["ref"] == "alpha@1"
    assert beta.lineage["parent"]["sha256"] == reg.resolve("alpha@1").files["adapter_model.safetensors"].sha256
    write_task(workspace, "alpha", "the dog ran")
    second = Pipeline(spec).run()
    assert [(o.name, o.action, o.reasons) for o in second] == [
        ("alpha", "trained", ["data changed (test, train)"]),
        ("beta", "trained", ["parent adapter changed"]),
    ]
    assert reg.resolve("beta").lineage["pipeline"]["inputs"]["parent"]["ref"] == "alpha@2"
