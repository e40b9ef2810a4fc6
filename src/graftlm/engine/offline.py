"""Many requests through one engine at once, offline: evaluation answers, synthetic data, RL samples.

Every job is queued up front and the engine loop runs on the calling thread (the fast place for it, see
`Engine.run_forever`) until the last one finishes; the engine batches rows of different adapters and
sampling settings together, so k samples of a prompt or a dozen adapters' answers cost one pass.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from graftlm.engine.adapter_finder import Source
from graftlm.engine.engine import Engine
from graftlm.engine.request import Output
from graftlm.engine.sampling import SamplingParams
from graftlm.progress import progress


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    params: SamplingParams
    adapters: tuple[tuple[Source, float], ...] = ()


@dataclass
class Finished:
    """A job's answer: its tokens (stop token included when it stopped on one), text and why it ended."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""


def run_jobs(engine: Engine, jobs: Sequence[Job], label: str = "generating", unit: str = "answers") -> list[Finished]:
    """Every job's answer, in order; a job that fails raises its error after the others finish."""
    out = [Finished() for _ in jobs]
    pending = [len(jobs)]
    finished = threading.Event()  # set when the last job ends
    if not jobs:
        finished.set()
    errors: list[Exception] = []
    with progress(label, len(jobs), unit) as bar:

        def sink_for(i: int):  # type: ignore[no-untyped-def]
            parts: list[str] = []

            def sink(o: Output) -> None:
                parts.append(o.delta)
                if o.token is not None:
                    out[i].token_ids.append(o.token)
                if o.error is not None:
                    errors.append(o.error)
                if o.finish_reason is not None or o.error is not None:
                    out[i].text = "".join(parts)
                    out[i].finish_reason = o.finish_reason or "error"
                    pending[0] -= 1
                    bar.advance(1)
                    if pending[0] == 0:
                        finished.set()

            return sink

        for i, job in enumerate(jobs):
            engine.submit(job.prompt, job.params, list(job.adapters), sink_for(i))
        if engine.started:  # its own thread runs the loop: wait for the answers
            finished.wait()
        else:
            engine.run_forever(until=finished.is_set)
    if errors:
        raise errors[0]
    return out
