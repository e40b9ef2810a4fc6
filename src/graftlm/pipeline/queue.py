"""A durable job queue in SQLite: data sources push jobs, workers claim them under a lease.

A worker renews its lease while it works; if it dies, the lease runs out and the job goes to the next
worker, so no job is lost. Jobs are pipeline runs, which do nothing when nothing is stale, so a job
that is run again after a crash has no second visible effect.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graftlm.registry.index import connect, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,            -- an adapter name, or * for every adapter
    reason TEXT NOT NULL,
    state TEXT NOT NULL,             -- queued | running | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    not_before REAL NOT NULL,        -- retry back-off
    lease_until REAL,
    worker TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    result TEXT,                     -- JSON
    error TEXT
)
"""
ALL = "*"


@dataclass(frozen=True)
class Job:
    id: int
    target: str
    reason: str
    state: str
    attempts: int
    max_attempts: int
    worker: str | None
    created: float
    updated: float
    result: Any
    error: str | None


def _job(r: sqlite3.Row) -> Job:
    return Job(
        r["id"], r["target"], r["reason"], r["state"], r["attempts"], r["max_attempts"], r["worker"],
        r["created"], r["updated"], json.loads(r["result"]) if r["result"] else None, r["error"],
    )  # fmt: skip


class JobQueue:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with self.db() as db, transaction(db):
            db.execute(SCHEMA)

    @contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        db = connect(self.path)
        try:
            yield db
        finally:
            db.close()

    def push(self, target: str, reason: str, max_attempts: int = 3) -> int:
        """Queue a run of `target`; a job for it that is still waiting absorbs the new reason instead."""
        now = time.time()
        with self.db() as db, transaction(db):
            row = db.execute("SELECT id, reason FROM jobs WHERE target = ? AND state = 'queued'", (target,)).fetchone()
            if row is not None:
                if reason not in row["reason"].split("; "):
                    db.execute(
                        "UPDATE jobs SET reason = ?, updated = ? WHERE id = ?",
                        (row["reason"] + "; " + reason, now, row["id"]),
                    )
                return int(row["id"])
            cur = db.execute(
                "INSERT INTO jobs (target, reason, state, max_attempts, not_before, created, updated) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (target, reason, max_attempts, now, now, now),
            )
            return int(cur.lastrowid or 0)

    def claim(self, worker: str, lease_s: float) -> Job | None:
        """Take the oldest job that is due, or whose worker's lease ran out; None if there is none."""
        now = time.time()
        with self.db() as db, transaction(db):
            # a job whose workers kept dying fails instead of looping forever
            db.execute(
                "UPDATE jobs SET state = 'failed', updated = ?, "
                "error = 'its worker stopped without finishing, ' || attempts || ' attempts' "
                "WHERE state = 'running' AND lease_until < ? AND attempts >= max_attempts",
                (now, now),
            )
            row = db.execute(
                "SELECT id FROM jobs WHERE (state = 'queued' AND not_before <= ?) "
                "OR (state = 'running' AND lease_until < ?) ORDER BY id LIMIT 1",
                (now, now),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, worker = ?, lease_until = ?, updated = ? "
                "WHERE id = ?",
                (worker, now + lease_s, now, row["id"]),
            )
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def renew(self, job_id: int, worker: str, lease_s: float) -> bool:
        """Extend a lease; False if the job is no longer this worker's (its lease ran out and another took it)."""
        now = time.time()
        with self.db() as db, transaction(db):
            cur = db.execute(
                "UPDATE jobs SET lease_until = ?, updated = ? WHERE id = ? AND worker = ? AND state = 'running'",
                (now + lease_s, now, job_id, worker),
            )
            return cur.rowcount == 1

    def finish(self, job_id: int, worker: str, result: Any) -> bool:
        now = time.time()
        with self.db() as db, transaction(db):
            cur = db.execute(
                "UPDATE jobs SET state = 'done', result = ?, error = NULL, lease_until = NULL, updated = ? "
                "WHERE id = ? AND worker = ? AND state = 'running'",
                (json.dumps(result), now, job_id, worker),
            )
            return cur.rowcount == 1

    def fail(self, job_id: int, worker: str, error: str, backoff_s: float, result: Any = None) -> str:
        """Queue the job again after `backoff_s * 2**(attempts-1)` seconds, or fail it for good once it
        has used its attempts; returns the job's new state."""
        now = time.time()
        with self.db() as db, transaction(db):
            row = db.execute(
                "SELECT attempts, max_attempts FROM jobs WHERE id = ? AND worker = ?", (job_id, worker)
            ).fetchone()
            if row is None:
                return "lost"
            state = "failed" if row["attempts"] >= row["max_attempts"] else "queued"
            delay = backoff_s * 2 ** (row["attempts"] - 1)
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, result = ?, not_before = ?, lease_until = NULL, updated = ? "
                "WHERE id = ?",
                (state, error, json.dumps(result) if result is not None else None, now + delay, now, job_id),
            )
            return state

    def jobs(self, state: str | None = None, limit: int = 100) -> list[Job]:
        with self.db() as db:
            q = "SELECT * FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY id DESC LIMIT ?"
            return [_job(r) for r in db.execute(q, (state, limit) if state else (limit,))]

    def get(self, job_id: int) -> Job | None:
        with self.db() as db:
            r = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return _job(r) if r else None
