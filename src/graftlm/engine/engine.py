"""The serving engine: continuous batching, each row with its own adapter (or weighted mix of adapters)
and sampling settings, requests joining and leaving the batch at every step.

One engine thread owns the model. Each iteration it drops cancelled requests, admits waiting ones whose
adapters are resident (`Scheduler`; a cold adapter loads on the cache's loader thread meanwhile, and
requests behind it go ahead), runs one decode step and one bounded prefill (`ModelRunner`), and settles
the outputs: chooses each row's token, streams it to the request's sink, finishes requests.

One request cannot hurt another: its settings are checked before it is queued; a row whose output is
not finite is failed alone (a packed prefill retries its prompts one by one to find it) and its KV row
is zeroed, so the stale positions a later request's mask hides are always finite and weigh exactly 0;
an error choosing one row's token or readying one request fails that request only; and tenants take
turns for rows (`graftlm.engine.admission`).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graftlm.engine.adapter_cache import AdapterCache
from graftlm.engine.adapter_finder import AdapterFinder, Source
from graftlm.engine.admission import Placed
from graftlm.engine.json_mode import JSON_OBJECT, JsonConstraint, JsonVocab
from graftlm.engine.json_schema import compile_schema
from graftlm.engine.kv_cache import RowKVCache
from graftlm.engine.prefix_cache import PrefixCache
from graftlm.engine.request import Output, Request
from graftlm.engine.runner import ModelRunner, checked_picks, finite_rows
from graftlm.engine.sampling import SamplingParams
from graftlm.engine.scheduler import Scheduler
from graftlm.engine.sequence import Decoding, check_prompt
from graftlm.engine.speculate import (
    SPEC_MAX_BATCH,
    SPEC_TOKENS,
    AnswerMemory,
    accepted_prefix,
    check_spec_tokens,
    propose,
    verify,
)
from graftlm.errors import ConfigError, GraftlmError
from graftlm.lora.config import AdapterError
from graftlm.lora.slots import AdapterSlots
from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer
from graftlm.setting import setting

log = logging.getLogger(__name__)

MAX_ADAPTER_WEIGHT = 10.0  # |weight| of one adapter in a mix


class EngineOverloadedError(GraftlmError):
    """More requests are waiting than the engine accepts (`max_waiting`, `max_queued_per_tenant`)."""


class TenantBusyError(EngineOverloadedError):
    """One tenant has `max_queued_per_tenant` requests in the engine already."""


def prefix_key(req: Request) -> tuple[tuple[str, tuple[int, int, int], float], ...]:
    """What a prompt's keys and values depend on besides its tokens: each adapter's version (its name and
    the weights file it was loaded from) and weight in the mix; () for the base model."""
    return tuple((e.source.key, e.stamp, w) for e, (_, w) in zip(req.entries, req.adapters, strict=True))


class NonFiniteOutputError(GraftlmError):
    """A request's forward gave NaN or infinite logits (its adapter or mix is broken); it alone fails."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = setting(32, "rows decoded together (and KV rows allocated)")
    max_len: int = setting(2048, "prompt + answer tokens per request (cut to the model's context window)")
    prefill_tokens: int = setting(256, "prompt tokens per prefill step; bounds the stall of running requests")
    adapter_cache_mb: float = setting(1024.0, "MB for resident adapters, least recently used evicted")
    max_rank: int = setting(16, "largest adapter rank")
    adapter_dtype: str = setting(
        "bfloat16",
        "how resident adapters are held; bfloat16 is exact for adapters stored in bf16",
        choices=("bfloat16", "float32"),
    )
    prefix_cache_mb: float = setting(
        256.0, "MB of keys and values kept for prompt prefixes that requests share (0: none)"
    )
    max_waiting: int = setting(10_000, "requests waiting for a row beyond which new ones are refused (503)")
    max_queued_per_tenant: int = setting(4096, "one tenant's requests in the engine, waiting or running (429)")
    speculate: str | None = setting(
        None,
        "draft tokens by prompt lookup and verify them in the decode step (greedy output unchanged)",
        choices=("ngram",),
    )
    spec_tokens: int = setting(SPEC_TOKENS, "--speculate: most tokens drafted for a row in one step, 1-16")
    spec_max_batch: int = setting(
        SPEC_MAX_BATCH, "--speculate: draft only while at most this many rows decode (a full batch gains nothing)"
    )
    strategy: str = "auto"  # how rows with different adapters are computed (see lora.batched)


class Engine:
    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        config: EngineConfig = EngineConfig(),
        adapters: AdapterFinder | Path | None = None,
        force: bool = False,
    ):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        if config.speculate is not None:
            check_spec_tokens(config.spec_tokens)
        self.answers = AnswerMemory()  # finished answers per tenant and adapters, for speculation's drafts
        self.device = model.device
        self.stop_ids = tokenizer.stop_ids(model.config.eos_token_id)
        self.max_len = min(config.max_len, model.config.max_position_embeddings)
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[config.adapter_dtype]
        n_slots = max(1, int(config.adapter_cache_mb * 2**20 // AdapterSlots.slot_bytes(model, config.max_rank, dtype)))
        self.slots = AdapterSlots(model, n_slots, config.max_rank, dtype)
        self.cache = AdapterCache(self.slots, adapters, force)
        self.cache.on_change = self._wake
        self.kv = RowKVCache(model.config, config.max_batch, self.max_len, model.dtype, self.device)
        self.scheduler = Scheduler(self.kv, config.max_batch, config.prefill_tokens)
        self.runner = ModelRunner(model, self.kv, config.strategy)
        self.prefix = PrefixCache(int(config.prefix_cache_mb * 2**20)) if config.prefix_cache_mb > 0 else None
        self._incoming: deque[Request] = deque()
        self._open: Counter[str] = Counter()  # requests submitted and not finished, by tenant (under _cond)
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._looping = False  # a loop steps the rows: a second one on another thread would corrupt them
        self._json: JsonVocab | None = None
        # what happened and where the time went (also exported by /metrics)
        self.steps = self.tokens_generated = self.step_errors = self.peak_batch = 0
        self.decode_seconds = self.prefill_seconds = 0.0
        self.decode_steps = self.decode_rows = self.prefill_tokens = 0
        log.info(
            "engine: %d rows x %d positions (KV %.0f MB), %d adapter slots of rank <= %d (%.0f MB)",
            config.max_batch,
            self.max_len,
            self.kv.nbytes / 2**20,
            n_slots,
            config.max_rank,
            self.slots.nbytes / 2**20,
        )

    # ---- the callers' side (any thread) --------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        adapters: Sequence[tuple[Source, float]] = (),
        sink: Callable[[Output], None] | None = None,
        json_mode: bool = False,
        json_schema: dict[str, Any] | None = None,
        tenant: str = "",
    ) -> Request:
        """Queue a request; its outputs go to `sink` (called on the engine thread), see `run`.

        json_mode: constrain the output to a valid JSON object (see `graftlm.engine.json_mode`);
        json_schema: to an object of this schema (see `graftlm.engine.json_schema`; SchemaError if unsupported).
        tenant: who asks; tenants share the rows fairly (see `graftlm.engine.admission`).
        """
        check_prompt(prompt, self.max_len, "this server's context")
        for src, w in adapters:
            if not (math.isfinite(w) and abs(w) <= MAX_ADAPTER_WEIGHT):
                raise ConfigError(
                    f"adapter {src.key} has weight {w}: a weight is a finite number within ±{MAX_ADAPTER_WEIGHT:g}"
                )
        grammar = compile_schema(json_schema) if json_schema is not None else JSON_OBJECT if json_mode else None
        req = Request(list(prompt), params, list(adapters), sink or (lambda o: None), grammar=grammar)
        req.tenant = tenant
        with self._cond:
            if self.queue_depth >= self.config.max_waiting:
                raise EngineOverloadedError(f"{self.config.max_waiting} requests are already waiting; try again later")
            if self._open[tenant] >= self.config.max_queued_per_tenant:
                raise TenantBusyError(
                    f"{self.config.max_queued_per_tenant} of your requests are already queued or running; "
                    "try again later"
                )
            self._open[tenant] += 1
            self._incoming.append(req)
            self._cond.notify()
        return req

    def run(
        self, prompt: Sequence[int], params: SamplingParams, adapters: Sequence[tuple[Source, float]] = ()
    ) -> Iterator[Output]:
        """Submit and yield the request's outputs as they come (blocking; for offline use and tests)."""
        q: queue.Queue[Output] = queue.Queue()
        req = self.submit(prompt, params, adapters, q.put)
        try:
            while True:
                out = q.get()
                yield out
                if out.finish_reason is not None or out.error is not None:
                    return
        finally:
            req.cancel()

    def start(self) -> Engine:
        """Run the engine loop on a background thread (convenient; see `run_forever` for speed)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self.run_forever, name="graftlm-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def started(self) -> bool:
        """Whether `start()` runs the loop on the engine's own thread."""
        return self._thread is not None

    def run_forever(self, until: Callable[[], bool] | None = None) -> None:
        """Run the engine loop on the calling thread until `stop()` or `until()` is true.

        Prefer the thread that loaded the model (the main thread): libgomp keeps one pool of worker
        threads per thread that runs parallel torch ops, and with two pools on a 2-core machine it stops
        spin-waiting between ops, which makes every decode step slower (benchmarks/README.md, "Engine thread
        and malloc").
        """
        with self._cond:
            if self._looping:
                raise RuntimeError(
                    "the engine loop is already running (start() runs it on a thread): a second loop would step "
                    "the same rows; submit requests and wait for their outputs instead"
                )
            self._looping = True
        try:
            while not (until is not None and until()):
                with self._cond:
                    if self._stop:
                        break
                    self._take_incoming()
                    if not (self.scheduler.running or self.scheduler.has_room()):
                        self._cond.wait(timeout=0.05)
                        continue
                try:
                    if not self._iterate():
                        with self._cond:  # only requests waiting for adapter loads: sleep until one lands
                            self._cond.wait(timeout=0.01)
                except Exception as e:  # a bug must fail the running requests, not the server
                    log.exception("engine step failed")
                    self.step_errors += 1
                    for req in self.scheduler.running:
                        self._finish(req, error=e)
        finally:
            with self._cond:
                self._looping = False
                self._take_incoming()
            for req in self.scheduler.take_all():
                self._finish(req, error=GraftlmError("the server is shutting down"))

    def stop(self) -> None:
        """Stop the loop (wherever it runs) and the adapter loader; requests still running fail."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None
        self.cache.close()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a row (read from any thread: counters, not the queues)."""
        return max(0, self._open.total() - len(self.decoding) - len(self.prefilling))

    @property
    def batch_size(self) -> int:
        return len(self.scheduler.decoding)

    @property
    def decoding(self) -> list[Request]:
        return self.scheduler.decoding

    @property
    def prefilling(self) -> list[Request]:
        return self.scheduler.prefilling

    # ---- the engine thread ---------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _take_incoming(self) -> None:
        while self._incoming:
            self.scheduler.waiting.push(self._incoming.popleft())

    def _iterate(self) -> bool:
        """One engine step; False when there was nothing to run."""
        for req in self.scheduler.take_cancelled():
            self._finish(req, reason="cancelled")
        self.scheduler.admit(self._place)
        if not self.scheduler.running:
            return False
        with torch.inference_mode():
            if self.decoding:
                t0 = time.perf_counter()
                reqs = list(self.decoding)
                self.peak_batch = max(self.peak_batch, len(reqs))
                self.decode_rows += len(reqs)
                self.decode_steps += 1
                drafts = self._drafts(reqs)
                if drafts is None:
                    self._settle(reqs, self.runner.decode(reqs))
                else:
                    self._settle_verified(reqs, drafts, self.runner.verify(reqs, drafts))
                self.decode_seconds += time.perf_counter() - t0
            if self.prefilling:
                t0 = time.perf_counter()
                self._restore_prefixes()
                step = self.scheduler.next_prefill()
                self.prefill_tokens += step.length if not step.packed else sum(len(r.prompt) for r in step.reqs)
                logits = self.runner.prefill(step)
                if logits is not None:
                    self._settle_prefill(step.reqs, step.packed, logits)
                self.prefill_seconds += time.perf_counter() - t0
        self.steps += 1
        return True

    def _drafts(self, reqs: list[Request]) -> list[list[int]] | None:
        """Each decoding row's drafts by prompt lookup, or None for a plain step (speculation off, the
        batch too large for drafts to pay, or nothing drafted). Rows whose output is constrained (JSON
        mode) draft nothing; no row's drafts run past its budget or its KV row."""
        if self.config.speculate is None or len(reqs) > self.config.spec_max_batch:
            return None
        width = min(self.config.spec_tokens, min(self.max_len - r.filled for r in reqs) - 1)  # padding included
        drafts = []
        for r in reqs:
            d = r.decoding
            room = min(width, d.budget - d.produced - 1)
            if room > 0 and d.constraint is None:
                drafts.append(propose(r.prompt + r.token_ids, room, memory=self.answers.get(self._answers_key(r))))
            else:
                drafts.append([])
        return drafts if any(drafts) else None

    @staticmethod
    def _answers_key(r: Request) -> tuple[str, tuple[tuple[str, tuple[int, int, int], float], ...]]:
        return r.tenant, prefix_key(r)

    def _settle_verified(self, reqs: list[Request], drafts: list[list[int]], logits: torch.Tensor) -> None:
        """A verification step's rows: each keeps its accepted drafts and one token of the model's own
        (`speculate.verify`), in order, as if decoded one by one; a row with a non-finite output fails alone."""
        width = logits.shape[1]
        both = torch.stack([torch.isfinite(logits).all(-1).long(), logits.argmax(-1)]).tolist()  # one transfer
        finished = False
        for i, (r, draft) in enumerate(zip(reqs, drafts, strict=True)):
            if not all(both[0][i][: len(draft) + 1]):
                self._fail_non_finite(r, written=r.filled + width)
                finished = True
                continue
            try:
                if self._greedy(r):
                    kept = accepted_prefix(both[1][i], draft)
                    new = [*draft[:kept], both[1][i][kept]]
                else:
                    new = verify(logits[i, : len(draft) + 1], draft, r.decoding.params, r.decoding.generator)
            except Exception as e:  # this row's settings: fail it alone
                log.warning("request failed verifying its drafts: %s", e)
                self._finish(r, error=e)
                finished = True
                continue
            for name in [s.name for s, _ in r.adapters] or [""]:
                st = self.cache.stat(name)
                st.spec_steps += 1
                st.drafted += len(draft)
                st.accepted += len(new) - 1
            r.filled += len(new)  # the last token and the accepted drafts now hold their keys and values
            finished |= self._take(r, new)
        if finished:
            self.scheduler.pack()

    def _take(self, r: Request, tokens: list[int]) -> bool:
        """Hand a row its next tokens in order; True when it finished (or failed) on one of them."""
        for tok in tokens:
            try:
                got = r.decoding.accept(tok)
            except Exception as e:
                log.warning("request failed choosing its token: %s", e)
                self._finish(r, error=e)
                return True
            r.last_token = tok
            r.token_ids.append(tok)
            self.tokens_generated += 1
            if got.finish_reason is not None:
                self._finish(r, reason=got.finish_reason, token=tok, delta=got.delta)
                return True
            r.sink(Output(tok, got.delta))
        return False

    def _restore_prefixes(self) -> None:
        """Rows about to prefill take what the prefix cache holds of their prompts (checked again at each
        step until they start: a prompt ahead of them may be storing the shared prefix)."""
        if self.prefix is None:
            return
        for r in self.prefilling:
            if r.filled == 0 and not r.alone:
                r.filled = self.prefix.restore(prefix_key(r), r.prompt, self.kv, r.row)

    def _place(self, req: Request) -> Placed:
        """Ready `req` to take a row if its adapters are resident; a request that cannot run fails alone."""
        try:
            entries = self.cache.try_acquire([s for s, _ in req.adapters], first_try=not req.tried)
        except Exception as e:
            self._finish(req, error=e)
            return "gone"
        req.tried = True
        if entries is None:
            return "wait"  # its adapter is loading; later requests may go ahead
        req.entries = entries
        try:
            if len(entries) > 1 and any(e.use_dora for e in entries):
                names = ", ".join(e.source.key for e in entries if e.use_dora)
                raise AdapterError(f"DoRA adapters ({names}) cannot be combined with others")
            budget = min(req.params.max_new_tokens, self.max_len - len(req.prompt))
            constraint = JsonConstraint(self._json_vocab(), req.grammar) if req.grammar is not None else None
            req.decoding = Decoding(req.params, self.tokenizer, self.stop_ids, budget, self.device, constraint)
        except Exception as e:
            self._finish(req, error=e)  # releases its adapters
            return "gone"
        return "admitted"

    def _json_vocab(self) -> JsonVocab:
        if self._json is None:
            self._json = JsonVocab(self.tokenizer, self.model.config.vocab_size, self.stop_ids)
        return self._json

    def _settle(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Rows with finite logits choose their next token; the others fail alone."""
        picks: list[int] | None = None
        if any(self._greedy(r) for r in reqs):
            ok, picks = checked_picks(logits)
        else:
            ok = finite_rows(logits)
        if not all(ok):
            for r, fine in zip(reqs, ok, strict=True):
                if not fine:
                    self._fail_non_finite(r)
            self.scheduler.pack()
            keep = [i for i, fine in enumerate(ok) if fine]
            reqs, logits = [reqs[i] for i in keep], logits[keep]
            picks = [picks[i] for i in keep] if picks is not None else None
        self._choose(reqs, logits, picks)

    def _settle_prefill(self, reqs: list[Request], packed: bool, logits: torch.Tensor) -> None:
        ok = finite_rows(logits)
        if not all(ok):
            for r, fine in zip(reqs, ok, strict=True):
                if fine:
                    continue
                if packed and len(reqs) > 1:  # NaN in one prompt's keys reaches every prompt packed with it
                    self.scheduler.set_back(r)
                else:
                    self._fail_non_finite(r)
            keep = [i for i, fine in enumerate(ok) if fine]
            reqs, logits = [reqs[i] for i in keep], logits[keep]
        self.scheduler.prefilled(reqs)
        if self.prefix is not None:
            for r in reqs:
                self.prefix.store(prefix_key(r), r.prompt, self.kv, r.row)
        if reqs:
            self._choose(reqs, logits)

    def _fail_non_finite(self, req: Request, written: int = 0) -> None:
        """Fail a row whose output was NaN or infinite, zeroing its KV first (up to `written` where a step
        wrote past its tokens): stale positions of a row are hidden by later requests' masks, and a masked
        0 times NaN would still be NaN."""
        self.kv.clear(req.row, min(self.max_len, max(req.filled, written)))
        message = (
            "the model's output for this request is not finite (NaN or infinity): its adapter or mix is broken; "
            "other requests are unaffected"
        )
        self._finish(req, error=NonFiniteOutputError(message))

    @staticmethod
    def _greedy(r: Request) -> bool:
        return r.decoding.params.greedy and r.decoding.constraint is None

    def _choose(self, reqs: Sequence[Request], logits: torch.Tensor, picks: list[int] | None = None) -> None:
        """Each row's next token: greedy rows take `picks` (their argmax, read back with the finite check),
        the others sample; a row finishing or failing gives up its row."""
        greedy = [self._greedy(r) for r in reqs]
        if picks is None:
            picks = logits.argmax(-1).tolist() if any(greedy) else []
        finished = False
        for i, r in enumerate(reqs):
            try:
                tok = picks[i] if greedy[i] else r.decoding.choose(logits[i])
            except Exception as e:  # this row's settings or text: fail it alone
                log.warning("request failed choosing its token: %s", e)
                self._finish(r, error=e)
                finished = True
                continue
            finished |= self._take(r, [tok])
        if finished:
            self.scheduler.pack()

    def _finish(
        self,
        req: Request,
        reason: str | None = None,
        error: Exception | None = None,
        token: int | None = None,
        delta: str = "",
    ) -> None:
        """Settle a request: its counters, its adapters released, its row given up, its last event sent."""
        if req.done:
            return
        req.finished_at = time.monotonic()
        with self._cond:
            self._open[req.tenant] -= 1
            if self._open[req.tenant] <= 0:
                del self._open[req.tenant]
        for name in [s.name for s, _ in req.adapters] or [""]:
            st = self.cache.stat(name)
            st.requests += 1
            st.prompt_tokens += len(req.prompt)
            st.completion_tokens += len(req.token_ids)
        # the answer's key for speculation's memory, before its adapters are released (a request that never
        # held them has no answer)
        remember = self.config.speculate is not None and reason in ("stop", "length")
        remember = remember and len(req.entries) == len(req.adapters)
        key = self._answers_key(req) if remember else None
        if req.entries:
            self.cache.release(req.entries)
            req.entries = []
        self.scheduler.remove(req)
        if reason == "stop" and token in self.stop_ids and req.token_ids and req.token_ids[-1] == token:
            req.token_ids.pop()  # the EOS token is not part of the answer
        if key is not None:
            self.answers.add(key, req.token_ids)
        try:
            req.sink(Output(token, delta, reason, error))
        except Exception:  # a sink that fails (client gone) must not stop the engine
            log.exception("delivering the end of a request")
