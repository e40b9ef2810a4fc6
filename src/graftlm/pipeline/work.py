"""The heavy part of a pipeline run as values in and values out, so that an executor can run it here or
on another machine: train a stale adapter and score it (and prod, and grade it), or score the base model
once per test split. The driver (`pipeline.run`) decides every input from the registry beforehand and
publishes the results itself: executors never write to the registry.

Executors: `local` runs the work in this process, one item after another (the default); `ray` runs each
item as a Ray task with its own resource request, in parallel across the cluster (`graftlm[ray]`). Paths
in the work (data, the state's work folder, prod's checkout) must be reachable from where the tasks run:
on one machine they are; on a cluster they live on shared storage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from graftlm.errors import GraftlmError
from graftlm.loading.catalog import Placement
from graftlm.pipeline.spec import Spec

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BaseScoring:
    """Score the base model on one adapter's test split (done once per distinct split and settings)."""

    spec: Spec
    name: str
    place: Placement


@dataclass(frozen=True)
class Training:
    """Train one stale adapter into `out` and score it; prod too when its score is not known yet."""

    spec: Spec
    name: str
    out: Path
    parent_dir: Path | None  # the adapter to start from
    prod_dir: Path | None  # prod's checkout: scored when `prod_score` is None, compared when graded
    prod_score: float | None
    score_prod: bool  # False: prod was made for another base model, its score means nothing here
    place: Placement


@dataclass(frozen=True)
class Trained:
    score: float
    examples: int
    prod_score: float | None
    evaluation: dict[str, Any] | None  # `graftlm eval`'s document, for adapters with a full evaluation
    seconds: float


def score_base(w: BaseScoring) -> float:
    from graftlm.pipeline.steps import evaluate_adapter

    return evaluate_adapter(w.spec.base, w.spec.adapter(w.name), None, w.place)[0]


def train_and_score(w: Training) -> Trained:
    from graftlm.pipeline.steps import evaluate_adapter, grade, train

    t0 = time.perf_counter()
    a = w.spec.adapter(w.name)
    train(w.spec.base, a, w.out, w.parent_dir, w.place)
    score, n = evaluate_adapter(w.spec.base, a, w.out, w.place)
    prod_score = w.prod_score
    if prod_score is None and w.score_prod and w.prod_dir is not None:
        prod_score = evaluate_adapter(w.spec.base, a, w.prod_dir, w.place)[0]
    doc = grade(w.spec.base, a, w.out, w.prod_dir, w.place) if a.full_evaluation else None
    return Trained(score, n, prod_score, doc, round(time.perf_counter() - t0, 1))


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R | Exception]:
        """`fn` of every item, in order; an item that raised gives its exception (the others go on)."""
        ...


class LocalExecutor:
    name = "local"

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R | Exception]:
        out: list[R | Exception] = []
        for item in items:
            try:
                out.append(fn(item))
            except Exception as e:  # one adapter's failure must not stop the others
                out.append(e)
        return out


class RayExecutor:
    """Each item a Ray task (`num_cpus` / `num_gpus` each), all in flight at once; Ray queues what the
    cluster cannot run yet. Connects to `address` (a running cluster, `auto`) or starts a local one."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0):
        try:
            import ray
        except ImportError:
            raise GraftlmError("--executor ray needs Ray: pip install 'graftlm[ray]'") from None
        self.ray = ray
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        log.info("ray executor: cluster resources %s", ray.cluster_resources())

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R | Exception]:
        if not items:
            return []
        task = self.ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)(fn)
        refs = [task.remote(item) for item in items]
        out: list[R | Exception] = []
        for ref in refs:
            try:
                out.append(self.ray.get(ref))
            except self.ray.exceptions.RayTaskError as e:
                out.append(_cause(e))
            except self.ray.exceptions.RayError as e:  # a worker or node died: that item failed
                out.append(GraftlmError(f"ray task lost: {e}"))
        return out


def _cause(e: Exception) -> Exception:
    """The exception the task raised, as its own type where Ray can give it back."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


def executor_for(name: str, address: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Executor:
    if name == "local":
        if address:
            raise GraftlmError("--address is for --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, num_cpus, num_gpus)
    raise GraftlmError(f"unknown executor {name!r}: local or ray")
