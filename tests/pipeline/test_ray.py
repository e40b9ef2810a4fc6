"""`graftlm pipeline run --executor ray` on a real local Ray cluster (2 CPUs, the tiny model): it publishes
what the local executor publishes for the same inputs, trains a child after its parent in a later wave,
and a second run trains nothing. Skipped, with the reason, only where Ray is missing or cannot start."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from graftlm.cli.main import main
from graftlm.pipeline.spec import load_spec
from graftlm.registry import PROD, Registry
from tests.pipeline.test_pipeline import SPEC, write_task

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'graftlm[ray]'; make test installs it)")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except Exception as e:  # e.g. no shared memory for the object store in this sandbox
        pytest.skip(f"a local Ray cluster could not start here: {type(e).__name__}: {e}")
    yield
    ray.shutdown()


def _workspace(root: Path, tiny_dir: Path) -> Path:
    write_task(root, "alpha", "the cat sat")
    write_task(root, "beta", "Meeting on Tuesday")
    write_task(root, "gamma", "the cat sat down")
    spec = SPEC.format(base=tiny_dir) + '[[adapter]]\nname = "gamma"\ndata = "data/gamma"\ninit_from = "alpha@prod"\n'
    (root / "adapters.toml").write_text(spec)
    return root / "adapters.toml"


def _published(spec_path: Path) -> dict[str, tuple[list[int], int | None, float]]:
    reg = Registry(load_spec(spec_path).registry)
    out = {}
    for name in ("alpha", "beta", "gamma"):
        versions = [v for v in reg.versions() if v.name == name]
        out[name] = (
            [v.version for v in versions],
            reg.aliases(name).get((name, PROD)),
            round(float(versions[-1].metrics["score"]), 4),
        )
    return out


def test_ray_executor_publishes_what_the_local_one_does(
    cluster: None, tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = _workspace(tmp_path / "local", tiny_dir)
    on_ray = _workspace(tmp_path / "ray", tiny_dir)
    assert main(["pipeline", "run", "--spec", str(local)]) == 0
    report = tmp_path / "ray.json"
    assert main(["pipeline", "run", "--spec", str(on_ray), "--executor", "ray", "--json", str(report)]) == 0
    outcomes = json.loads(report.read_text())
    assert [(o["name"], o["action"]) for o in outcomes] == [
        ("alpha", "trained"),
        ("beta", "trained"),
        ("gamma", "trained"),
    ]
    assert _published(on_ray) == _published(local)
    gamma = Registry(load_spec(on_ray).registry).resolve("gamma")
    assert gamma.lineage["pipeline"]["inputs"]["parent"]["ref"] == "alpha@1"  # trained after alpha was published
    assert not any((load_spec(on_ray).state / "work").glob("*"))  # the tasks' folders were published and removed

    capsys.readouterr()
    assert main(["pipeline", "run", "--spec", str(on_ray), "--executor", "ray", "--json", str(report)]) == 0
    assert {o["action"] for o in json.loads(report.read_text())} == {"fresh"}
    assert _published(on_ray)["alpha"][0] == [1]


def test_a_failing_ray_task_fails_its_adapter_and_its_child_only(cluster: None, tiny_dir: Path, tmp_path: Path) -> None:
    spec = _workspace(tmp_path, tiny_dir)
    shutil.rmtree(tmp_path / "data" / "alpha")
    (tmp_path / "data" / "alpha").mkdir()
    write_task(tmp_path, "alpha", "the cat sat")
    (tmp_path / "data" / "alpha" / "train.jsonl").write_text('{"broken": \n')  # fails inside the task
    report = tmp_path / "r.json"
    assert main(["pipeline", "run", "--spec", str(spec), "--executor", "ray", "--json", str(report)]) == 1
    got = {o["name"]: o for o in json.loads(report.read_text())}
    assert got["alpha"]["action"] == "failed" and "train.jsonl:1" in got["alpha"]["error"]
    assert got["beta"]["action"] == "trained"
    assert got["gamma"]["action"] == "skipped"
