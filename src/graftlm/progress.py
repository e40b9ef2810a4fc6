"""Progress of long steps (training steps, sequences written, tensors compressed, examples scored): a bar on
a terminal, and a plain log line at a steady interval when the output goes to a file, a pipe or a job
runner, so that `nohup graftlm train ... > log` still says how far it is and how long is left.

    with progress("training", total=120, unit="steps") as p:
        for ...:
            p.advance(loss="2.314", **{"tok/s": "1530"})
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0  # between log lines when the output is not a terminal ($GRAFTLM_PROGRESS_SECONDS)


def interval() -> float:
    try:
        return max(0.0, float(os.environ.get("GRAFTLM_PROGRESS_SECONDS", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


class Tracker:
    """How far a step is; shown as a bar, or logged every `interval` seconds (and at the end)."""

    def __init__(self, description: str, total: int | None, unit: str, bar: Progress | None):
        self.description, self.total, self.unit = description, total, unit
        self.completed = 0
        self.fields: dict[str, str] = {}
        self._bar = bar
        self._task = bar.add_task(description, total=total, info="") if bar is not None else None
        self._start = self._last_line = time.monotonic()
        self._every = interval()
        self._logged = -1

    def advance(self, n: int = 1, **fields: str) -> None:
        self.update(self.completed + n, **fields)

    def update(self, completed: int, **fields: str) -> None:
        self.completed = completed
        self.fields.update(fields)
        if self._bar is not None and self._task is not None:
            info = "  ".join(f"{k} {v}" for k, v in self.fields.items())
            self._bar.update(self._task, completed=completed, info=info)
            return
        now = time.monotonic()
        if self._logged < 0 or now - self._last_line >= self._every:
            self._line(now)

    def finish(self) -> None:
        if self._bar is None and self._logged != self.completed:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        elapsed = now - self._start
        done = f"{self.completed}/{self.total}" if self.total else str(self.completed)
        parts = [f"{self.description}: {done} {self.unit}"]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        parts.append(f"{_clock(elapsed)} elapsed")
        if self.total and 0 < self.completed < self.total:
            parts.append(f"{_clock(elapsed * (self.total - self.completed) / self.completed)} left")
        log.info(", ".join(parts))
        self._last_line, self._logged = now, self.completed


@contextmanager
def progress(description: str, total: int | None, unit: str = "items") -> Iterator[Tracker]:
    """A tracker for one long step: a transient bar on a terminal, log lines otherwise."""
    if not sys.stderr.isatty():
        tracker = Tracker(description, total, unit, None)
        yield tracker
        tracker.finish()
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        yield Tracker(description, total, unit, bar)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
