"""One pipeline run: find stale adapters, retrain, evaluate, gate, publish, and move `prod` if the gate passed.

For each adapter of the spec (parents first):
  inputs = hashes of base model, data, settings and parent version
  fresh if the newest version the pipeline published has the same inputs; else
  train (from the parent where init_from says so) -> score the adapter, the base model and prod on
  the test split -> gate -> publish the version with its lineage and scores, pointing prod at it in
  the same transaction only if the gate passed.
A failure is recorded for that adapter and the run goes on with the others. Runs are serialised by a
lock file: a second run waits, or refuses at once with `wait=False`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from graftlm.errors import GraftlmError
from graftlm.fileio import atomic_write, file_sha256
from graftlm.loading.catalog import Placement
from graftlm.lora.files import WEIGHTS_FILE
from graftlm.pipeline import fingerprints
from graftlm.pipeline.spec import AdapterSpec, Spec
from graftlm.pipeline.work import (
    BaseScoring,
    Executor,
    LocalExecutor,
    Trained,
    Training,
    score_base,
    train_and_score,
)
from graftlm.registry import PROD, Registry, RegistryError, Version

log = logging.getLogger(__name__)
LOCK_FILE = "pipeline.lock"
T = TypeVar("T")


class PipelineBusyError(GraftlmError):
    """Another pipeline run holds the lock."""


@dataclass
class Outcome:
    name: str
    action: str = "fresh"  # fresh | trained | failed | skipped
    reasons: list[str] = field(default_factory=list)  # why it ran (or why not)
    version: int | None = None
    score: float | None = None
    base_score: float | None = None
    prod_before: int | None = None
    prod_score: float | None = None
    passed: bool | None = None
    gate: list[str] = field(default_factory=list)
    prod_after: int | None = None
    error: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Assessment:
    inputs: dict[str, Any]
    reasons: list[str]  # why the adapter is stale; empty when it is fresh
    last: Version | None  # the newest version the pipeline published
    parent_dir: Path | None  # the adapter to train from


@contextlib.contextmanager
def run_lock(state: Path, wait: bool = True) -> Iterator[None]:
    state.mkdir(parents=True, exist_ok=True)
    with (state / LOCK_FILE).open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise PipelineBusyError(
                f"another pipeline run holds {state / LOCK_FILE} (pid {holder}); wait for it or pass --wait"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Pipeline:
    def __init__(self, spec: Spec, place: Placement = Placement()):
        """`place`: where the pipeline's training and scoring run (scores in another dtype are cached apart)."""
        self.spec = spec
        self.place = place
        self.registry = Registry(spec.registry)
        self._base_fp: str | None = None
        self._base_scores: dict[str, float] = {}

    @property
    def base_fp(self) -> str:
        if self._base_fp is None:
            self._base_fp = fingerprints.base_fingerprint(self.spec.base, self.spec.state)
        return self._base_fp

    # ---- planning ----------------------------------------------------------------------------
    def parent_of(self, a: AdapterSpec) -> tuple[dict[str, Any] | None, Path | None]:
        """The parent's identity (for the inputs) and its folder (to train from)."""
        if a.init_from is None:
            return None, None
        if a.parent_name() is None:
            folder = Path(a.init_from)
            return {
                "path": str(folder),
                "sha256": file_sha256(folder / WEIGHTS_FILE),
            }, folder
        v = self.registry.resolve(a.init_from)
        return {"ref": v.ref, "sha256": v.files[WEIGHTS_FILE].sha256}, self.registry.checkout(v)

    def last_run(self, name: str) -> Version | None:
        """The newest version of `name` the pipeline published (versions published by hand do not count)."""
        for v in reversed(self.registry.versions(name)):
            if "pipeline" in v.lineage:
                return v
        return None

    def status(self, a: AdapterSpec) -> Assessment:
        """The adapter's current inputs, why it is stale (no reasons: fresh), its last run, its parent."""
        parent, parent_dir = self.parent_of(a)
        ins = fingerprints.inputs(a, self.base_fp, parent)
        last = self.last_run(a.name)
        old = last.lineage["pipeline"]["inputs"] if last is not None else None
        return Assessment(ins, fingerprints.changes(old, ins), last, parent_dir)

    # ---- running -----------------------------------------------------------------------------
    def run(
        self, only: list[str] | None = None, force: bool = False, wait: bool = True, executor: Executor | None = None
    ) -> list[Outcome]:
        """Every chosen adapter brought up to date, in waves (an adapter trains after its parent is
        published): the driver assesses and publishes, `executor` (default: this process) trains and scores."""
        chosen = [a for a in self.spec.ordered() if not only or a.name in only]
        if only:
            for name in only:
                self.spec.adapter(name)  # unknown names fail before anything runs
        executor = executor or LocalExecutor()
        outcomes: dict[str, Outcome] = {}
        with run_lock(self.spec.state, wait):
            failed: set[str] = set()
            for wave in _waves(chosen):
                t0 = time.perf_counter()
                stale: list[tuple[AdapterSpec, Assessment, Outcome]] = []
                for a in wave:
                    if a.parent_name() in failed:
                        outcomes[a.name] = Outcome(a.name, "skipped", [f"its parent {a.parent_name()} failed"])
                        continue
                    out = outcomes[a.name] = Outcome(a.name)
                    now = self._guarded(out, lambda a=a, out=out: self._assess(a, force, out))  # type: ignore[misc]
                    if now is not None:
                        stale.append((a, now, out))
                self._run_wave(stale, executor)
                for a in wave:
                    o = outcomes[a.name]
                    o.seconds = o.seconds or round(time.perf_counter() - t0, 1)
                    if o.action == "failed":
                        failed.add(a.name)
        return [outcomes[a.name] for a in chosen]

    def _guarded(self, out: Outcome, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except Exception as e:  # one adapter's failure must not stop the others
            self._failed(out, e)
            return None

    @staticmethod
    def _failed(out: Outcome, e: Exception) -> None:
        out.action = "failed"
        out.error = f"{type(e).__name__}: {e}" if not isinstance(e, GraftlmError) else str(e)
        log.error("%s failed: %s", out.name, out.error)
        log.debug("%s", "".join(traceback.format_exception(e)))

    def _assess(self, a: AdapterSpec, force: bool, out: Outcome) -> Assessment | None:
        """The adapter's assessment when it must be retrained; None (the outcome filled in) when fresh."""
        now = self.status(a)
        out.reasons = now.reasons or (["forced"] if force else ["inputs unchanged"])
        if not now.reasons and not force:
            out.version = now.last.version if now.last else None
            out.prod_before = out.prod_after = self.registry.aliases(a.name).get((a.name, PROD))
            return None
        log.info("%s: %s", a.name, "; ".join(out.reasons))
        return now

    def _run_wave(self, stale: list[tuple[AdapterSpec, Assessment, Outcome]], executor: Executor) -> None:
        """Base scores once per distinct test split, then every stale adapter's training and scoring through
        the executor; then, here and one at a time, each result gated and published."""
        keys = {a.name: self._eval_key(now.inputs) for a, now, _ in stale}
        for a, now, _ in stale:
            if now.last is not None and now.last.metrics.get("eval_key") == keys[a.name]:
                cached = now.last.metrics.get("base_score")
                if cached is not None:
                    self._base_scores.setdefault(keys[a.name], float(cached))
        todo = {keys[a.name]: a.name for a, _, _ in stale if keys[a.name] not in self._base_scores}
        scored = executor.map(score_base, [BaseScoring(self.spec, name, self.place) for name in todo.values()])
        unscored: dict[str, Exception] = {}
        for key, got in zip(todo, scored, strict=True):
            if isinstance(got, Exception):
                unscored[key] = got
            else:
                self._base_scores[key] = got
        ready, works = [], []
        for a, now, out in stale:
            if keys[a.name] in unscored:
                self._failed(out, unscored[keys[a.name]])
                continue
            w = self._guarded(out, lambda a=a, now=now, out=out: self._training(a, keys[a.name], now.parent_dir, out))  # type: ignore[misc]
            if w is not None:
                ready.append((a, now, out))
                works.append(w)
        for (a, now, out), got in zip(ready, executor.map(train_and_score, works), strict=True):
            if isinstance(got, Exception):
                self._failed(out, got)
                continue
            self._guarded(out, lambda a=a, now=now, out=out, got=got: self._publish(a, now, keys[a.name], out, got))  # type: ignore[misc]

    def _work_dir(self, a: AdapterSpec) -> Path:
        return self.spec.state / "work" / a.name

    def _training(self, a: AdapterSpec, key: str, parent_dir: Path | None, out: Outcome) -> Training:
        prod = self._prod(a.name)
        out.prod_before = prod.version if prod else None
        prod_score, score_prod = None, False
        if prod is not None:
            if prod.metrics.get("eval_key") == key and prod.metrics.get("score") is not None:
                prod_score = float(prod.metrics["score"])
            score_prod = prod.lineage.get("base_fingerprint") == self.base_fp
        prod_dir = self.registry.checkout(prod) if prod is not None else None
        return Training(self.spec, a.name, self._work_dir(a), parent_dir, prod_dir, prod_score, score_prod, self.place)

    def _publish(self, a: AdapterSpec, now: Assessment, eval_key: str, out: Outcome, got: Trained) -> None:
        from graftlm.eval.suite import flat_figures

        ins, work = now.inputs, self._work_dir(a)
        out.action, out.seconds = "trained", got.seconds
        out.score, out.base_score, out.prod_score = got.score, self._base_scores[eval_key], got.prod_score
        out.passed, out.gate = a.gate.check(out.score, out.base_score, out.prod_score)
        evaluation = None
        figures: dict[str, float] = {}
        if got.evaluation is not None:
            figures = {k: v for k, v in flat_figures(got.evaluation, a.name).items() if "." not in k}
            passed, why = a.gate.check_figures(figures, out.prod_before is not None)
            out.passed, out.gate = out.passed and passed, out.gate + why
            evaluation = self.spec.state / "work" / f"{a.name}.evaluation.json"
            atomic_write(evaluation, json.dumps(got.evaluation, indent=1, ensure_ascii=False) + "\n")
        metrics = figures | {
            "metric": a.metric,
            "score": out.score,
            "base_score": out.base_score,
            "prod_score": out.prod_score,
            "examples": got.examples,
            "eval_key": eval_key,
            "gate": {"passed": out.passed, "reasons": out.gate},
        }
        lineage = {"pipeline": {"key": fingerprints.key(ins), "inputs": ins, "spec": str(self.spec.path)}}
        note = ("passed" if out.passed else "failed") + " the gate: " + "; ".join(out.gate)
        v = self.registry.publish(
            work, a.name, lineage, metrics, note, aliases=[PROD] if out.passed else [], evaluation=evaluation
        )
        out.version = v.version
        out.prod_after = v.version if out.passed else out.prod_before
        shutil.rmtree(work, ignore_errors=True)
        if evaluation is not None:
            evaluation.unlink(missing_ok=True)
        log.info("%s@%d: %s %.4f; %s", a.name, v.version, a.metric, out.score, note)

    def _eval_key(self, ins: dict[str, Any]) -> str:
        """What a score depends on: the base, the test data, the settings, and a dtype other than float32."""
        key = {"base": ins["base"], "test": ins["data"]["test"], "settings": ins["settings"]}
        if self.place.dtype != torch.float32:
            key["dtype"] = self.place.dtype_name
        return fingerprints.key(key)

    def _prod(self, name: str) -> Version | None:
        try:
            return self.registry.resolve(f"{name}@{PROD}")
        except RegistryError:
            return None


def _waves(chosen: list[AdapterSpec]) -> list[list[AdapterSpec]]:
    """The chosen adapters (parents first) in waves: each adapter one wave after its parent's."""
    level: dict[str, int] = {}
    for a in chosen:
        parent = a.parent_name()
        level[a.name] = level[parent] + 1 if parent in level else 0
    waves: list[list[AdapterSpec]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for a in chosen:
        waves[level[a.name]].append(a)
    return waves
