"""The pipeline worker: claims jobs from the queue, runs the pipeline for their adapters, records the
result, and retries failures with exponential back-off. In watch mode it also turns changes to the
spec's data files into jobs."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from graftlm.loading.catalog import Placement
from graftlm.pipeline.queue import ALL, Job, JobQueue
from graftlm.pipeline.run import Pipeline
from graftlm.pipeline.spec import Spec, load_spec

log = logging.getLogger(__name__)
QUEUE_FILE = "queue.db"


def queue_of(spec: Spec) -> JobQueue:
    return JobQueue(spec.state / QUEUE_FILE)


def targets_for_path(spec: Spec, path: Path) -> list[str]:
    """The adapters whose data includes `path` (a file, or a folder holding their files)."""
    p = path.resolve()
    hits = []
    for a in spec.adapters:
        files = [f.resolve() for f in a.files.values()]
        if any(f == p or p in f.parents for f in files):
            hits.append(a.name)
    return hits


class DataWatcher:
    """Polls the size and mtime of every data file the spec names (re-reading the spec, so new personal
    data folders are seen) and reports the adapters whose files changed or appeared."""

    def __init__(self, spec_path: Path):
        self.spec_path = spec_path
        self.stamps: dict[str, tuple] = self._snapshot()

    def _snapshot(self) -> dict[str, tuple]:
        spec = load_spec(self.spec_path)
        out = {}
        for a in spec.adapters:
            out[a.name] = tuple(sorted((str(f), *_stat(f)) for f in a.files.values()))
        return out

    def poll(self) -> list[str]:
        now = self._snapshot()
        changed = [name for name, stamp in now.items() if self.stamps.get(name) != stamp]
        self.stamps = now
        return changed


def _stat(f: Path) -> tuple[int, int]:
    try:
        st = f.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


class Worker:
    def __init__(
        self,
        spec_path: Path,
        lease_s: float = 120.0,
        backoff_s: float = 10.0,
        wait_lock: bool = True,
        place: Placement = Placement(),
    ):
        self.spec_path, self.place = spec_path, place
        self.queue = queue_of(load_spec(spec_path))
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.lease_s, self.backoff_s, self.wait_lock = lease_s, backoff_s, wait_lock

    def run_one(self) -> Job | None:
        """Claim and run one due job; None if the queue has none."""
        job = self.queue.claim(self.name, self.lease_s)
        if job is None:
            return None
        log.info("job %d: run %s (%s), attempt %d", job.id, job.target, job.reason, job.attempts)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, stop), daemon=True)
        beat.start()
        try:
            spec = load_spec(self.spec_path)  # read per job: edits to the spec count
            only = None if job.target == ALL else [job.target]
            outcomes = Pipeline(spec, self.place).run(only, wait=self.wait_lock)
            result = [o.as_dict() for o in outcomes]
            failed = [o for o in outcomes if o.action == "failed"]
            if failed:
                error = "; ".join(f"{o.name}: {o.error}" for o in failed)
                state = self.queue.fail(job.id, self.name, error, self.backoff_s, result)
                log.warning("job %d failed (%s), now %s", job.id, error, state)
            else:
                self.queue.finish(job.id, self.name, result)
                log.info("job %d done", job.id)
        except Exception as e:  # a bad spec or a crash in the pipeline: retry later, keep working
            state = self.queue.fail(job.id, self.name, f"{type(e).__name__}: {e}", self.backoff_s)
            log.warning("job %d failed (%s), now %s", job.id, e, state)
        finally:
            stop.set()
            beat.join()
        return self.queue.get(job.id)

    def _heartbeat(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 3):
            if not self.queue.renew(job_id, self.name, self.lease_s):
                log.warning("job %d: lost its lease", job_id)
                return

    def run(self, once: bool = False, watch: bool = False, interval: float = 2.0) -> int:
        """Work until stopped (or, with `once`, until no job is due); returns how many jobs ran."""
        watcher = DataWatcher(self.spec_path) if watch else None
        ran = 0
        while True:
            if watcher is not None:
                for name in watcher.poll():
                    self.queue.push(name, "data changed (watch)")
            job = self.run_one()
            ran += job is not None
            if job is None:
                if once:
                    return ran
                time.sleep(interval)
