"""The SQLite job queue: dedupe, leases, back-off, and jobs that outlive their worker."""

from __future__ import annotations

import time
from pathlib import Path

from graftlm.pipeline.queue import JobQueue


def test_push_dedupes_waiting_jobs_and_claims_in_order(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "q.db")
    a = q.push("summarize", "data changed")
    assert q.push("summarize", "base changed") == a  # still waiting: one job, both reasons
    b = q.push("proofread", "data changed")
    job = q.claim("w1", lease_s=60)
    assert job is not None and (job.id, job.reason, job.attempts) == (a, "data changed; base changed", 1)
    assert q.push("summarize", "data changed again") != a  # the running job may have read old data
    assert q.claim("w2", 60).id == b
    assert q.finish(a, "w1", {"ok": True})
    assert q.get(a).state == "done" and q.get(a).result == {"ok": True}


def test_a_dead_workers_job_goes_to_the_next_worker(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "q.db")
    job_id = q.push("s", "x")
    assert q.claim("dead", lease_s=0.05).id == job_id
    assert q.claim("alive", lease_s=60) is None  # the lease still holds
    time.sleep(0.1)
    job = q.claim("alive", lease_s=60)
    assert job is not None and job.id == job_id and job.attempts == 2
    assert not q.finish(job_id, "dead", {})  # the dead worker's late answer is refused
    assert not q.renew(job_id, "dead", 60)
    assert q.renew(job_id, "alive", 60) and q.finish(job_id, "alive", {})


def test_failures_back_off_then_fail_for_good(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "q.db")
    job_id = q.push("s", "x", max_attempts=2)
    q.claim("w", 60)
    assert q.fail(job_id, "w", "boom", backoff_s=0.2) == "queued"
    assert q.claim("w", 60) is None  # backing off
    time.sleep(0.25)
    assert q.claim("w", 60).attempts == 2
    assert q.fail(job_id, "w", "boom again", backoff_s=0.2) == "failed"
    assert q.get(job_id).error == "boom again" and q.claim("w", 60) is None


def test_a_job_whose_workers_keep_dying_fails(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "q.db")
    job_id = q.push("s", "x", max_attempts=1)
    q.claim("dead", lease_s=0.01)
    time.sleep(0.05)
    assert q.claim("next", 60) is None
    assert q.get(job_id).state == "failed" and "stopped without finishing, 1 attempts" in (q.get(job_id).error or "")
