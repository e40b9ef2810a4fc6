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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from graftlm.errors import GraftlmError
from graftlm.fileio import atomic_write, file_sha256
from graftlm.loading.catalog import Placement
from graftlm.lora.files import WEIGHTS_FILE
from graftlm.pipeline import fingerprints
from graftlm.pipeline.spec import AdapterSpec, Spec
from graftlm.registry import PROD, Registry, RegistryError, Version

log = logging.getLogger(__name__)
LOCK_FILE = "pipeline.lock"


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
    def run(self, only: list[str] | None = None, force: bool = False, wait: bool = True) -> list[Outcome]:
        chosen = [a for a in self.spec.ordered() if not only or a.name in only]
        if only:
            for name in only:
                self.spec.adapter(name)  # unknown names fail before anything runs
        outcomes: list[Outcome] = []
        with run_lock(self.spec.state, wait):
            failed: set[str] = set()
            for a in chosen:
                t0 = time.perf_counter()
                if a.parent_name() in failed:
                    out = Outcome(a.name, "skipped", [f"its parent {a.parent_name()} failed"])
                else:
                    out = self._one(a, force)
                out.seconds = round(time.perf_counter() - t0, 1)
                if out.action == "failed":
                    failed.add(a.name)
                outcomes.append(out)
        return outcomes

    def _one(self, a: AdapterSpec, force: bool) -> Outcome:
        out = Outcome(a.name)
        try:
            now = self.status(a)
            out.reasons = now.reasons or (["forced"] if force else ["inputs unchanged"])
            if not now.reasons and not force:
                out.version = now.last.version if now.last else None
                out.prod_before = out.prod_after = self.registry.aliases(a.name).get((a.name, PROD))
                return out
            log.info("%s: %s", a.name, "; ".join(out.reasons))
            self._train_and_publish(a, now, out)
        except Exception as e:  # one adapter's failure must not stop the others
            out.action = "failed"
            out.error = f"{type(e).__name__}: {e}" if not isinstance(e, GraftlmError) else str(e)
            log.error("%s failed: %s", a.name, out.error)
            log.debug("%s", traceback.format_exc())
        return out

    def _train_and_publish(self, a: AdapterSpec, now: Assessment, out: Outcome) -> None:
        from graftlm.eval.suite import flat_figures
        from graftlm.pipeline.steps import evaluate_adapter, grade, train

        ins = now.inputs
        work = self.spec.state / "work" / a.name
        train(self.spec.base, a, work, now.parent_dir, self.place)
        out.action = "trained"
        eval_key = self._eval_key(ins)
        out.score, n = evaluate_adapter(self.spec.base, a, work, self.place)
        out.base_score = self._base_score(a, now.last, eval_key)
        prod = self._prod(a.name)
        out.prod_before = prod.version if prod else None
        out.prod_score = self._prod_score(a, prod, eval_key) if prod else None
        out.passed, out.gate = a.gate.check(out.score, out.base_score, out.prod_score)
        evaluation = None
        figures: dict[str, float] = {}
        if a.full_evaluation:
            doc = grade(self.spec.base, a, work, self.registry.checkout(prod) if prod else None, self.place)
            figures = {k: v for k, v in flat_figures(doc, a.name).items() if "." not in k}
            passed, why = a.gate.check_figures(figures, prod is not None)
            out.passed, out.gate = out.passed and passed, out.gate + why
            evaluation = self.spec.state / "work" / f"{a.name}.evaluation.json"
            atomic_write(evaluation, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        metrics = figures | {
            "metric": a.metric,
            "score": out.score,
            "base_score": out.base_score,
            "prod_score": out.prod_score,
            "examples": n,
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

    def _base_score(self, a: AdapterSpec, last: Version | None, eval_key: str) -> float:
        from graftlm.pipeline.steps import evaluate_adapter

        if last is not None and last.metrics.get("eval_key") == eval_key and last.metrics.get("base_score") is not None:
            return float(last.metrics["base_score"])
        if eval_key not in self._base_scores:
            self._base_scores[eval_key], _ = evaluate_adapter(self.spec.base, a, None, self.place)
        return self._base_scores[eval_key]

    def _prod_score(self, a: AdapterSpec, prod: Version, eval_key: str) -> float | None:
        """Prod's score on today's test data and base; None if prod was made for another base model."""
        from graftlm.pipeline.steps import evaluate_adapter

        if prod.metrics.get("eval_key") == eval_key and prod.metrics.get("score") is not None:
            return float(prod.metrics["score"])
        if prod.lineage.get("base_fingerprint") != self.base_fp:
            return None
        score, _ = evaluate_adapter(self.spec.base, a, self.registry.checkout(prod), self.place)
        return score
