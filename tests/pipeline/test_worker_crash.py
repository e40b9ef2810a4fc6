"""SIGKILL a pipeline worker at random moments of its jobs (training, scoring, publishing, promoting),
50 times; no job may be lost, none may take effect twice, and the registry must stay whole."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

from graftlm.pipeline.run import Pipeline
from graftlm.pipeline.spec import load_spec
from graftlm.pipeline.worker import Worker, queue_of
from graftlm.registry import Registry
from tests.pipeline.test_pipeline import write_task

SPEC = """
base = "{base}"
[defaults.train]
rank = 2
max_steps = 2
batch = 4
max_length = 48
[defaults.gate]
beat_base_by = -1.0
[[adapter]]
name = "alpha"
data = "data/alpha"
[[adapter]]
name = "beta"
data = "data/beta"
"""
WORKER = "from graftlm.pipeline.worker import Worker; import sys; Worker(sys.argv[1], lease_s=1.0).run(once=True)"


def test_sigkill_during_worker_jobs(tmp_path: Path, tiny_dir: Path) -> None:
    for name in ("alpha", "beta"):
        write_task(tmp_path, name, "start")
    spec_path = tmp_path / "adapters.toml"
    spec_path.write_text(SPEC.format(base=tiny_dir))
    spec = load_spec(spec_path)
    queue = queue_of(spec)
    rng = random.Random(0)
    jobs = []
    for trial in range(50):
        name = ("alpha", "beta")[trial % 2]
        write_task(tmp_path, name, f"answer {trial}")
        jobs.append(queue.push(name, f"trial {trial}", max_attempts=1000))
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(spec_path)], cwd=Path(__file__).parents[2])
        time.sleep(rng.uniform(0.3, 2.5))
        proc.kill()
        proc.wait()
        reg = Registry(spec.registry, create=False)
        assert reg.verify(rehash=False) == [], f"trial {trial}"
        for (n, alias), number in reg.aliases().items():
            assert reg.resolve(f"{n}@{alias}").version == number

    time.sleep(1.1)  # the last killed worker's lease runs out
    Worker(spec_path, lease_s=30).run(once=True)
    states = {queue.get(j).state for j in jobs}
    assert states == {"done"}, states  # no job lost
    reg = Registry(spec.registry)
    assert reg.verify() == []
    for name in ("alpha", "beta"):
        keys = [v.lineage["pipeline"]["key"] for v in reg.versions(name)]
        assert len(keys) == len(set(keys)), name  # no run published twice
        assert reg.resolve(name).version == reg.versions(name)[-1].version
    assert [o.action for o in Pipeline(load_spec(spec_path)).run()] == ["fresh", "fresh"]
    killed_mid_job = sum(queue.get(j).attempts > 1 for j in jobs)
    assert killed_mid_job > 0
