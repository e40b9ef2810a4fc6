"""Continuous batching: requests join and leave the running batch at every step, each row with its own
adapter (or weighted mix of adapters) and sampling settings.

One engine thread owns the model. Each iteration it
  1. drops cancelled requests and admits waiting ones whose adapters are resident (a cold adapter is
     loaded by the cache's loader thread meanwhile; requests behind it are not held up);
  2. runs one decode step for every decoding row;
  3. runs one prefill forward of at most `prefill_tokens` tokens: several new prompts packed end to end
     into one sequence (a block-diagonal mask keeps them apart, so there is no padding), or one chunk of
     a long prompt, so a newcomer stalls running rows for one bounded chunk only.
KV memory is `RowKVCache`: `max_batch` rows of `max_len` positions, allocated once. Decoding rows sit
at 0..n-1 and prefilling rows after them; when a row leaves, later rows are moved down (a copy of
their filled positions only).

One request cannot hurt another: its settings are checked before it is queued, a row whose output is
not finite is failed alone (a packed prefill retries its rows one by one to find it) and its KV row is
zeroed, so the stale positions a later request's mask hides are always finite and weigh exactly 0;
an error choosing one row's token fails that row only; and tenants take turns for rows (`admission`).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graftlm.engine.adapter_cache import AdapterCache, Entry
from graftlm.engine.adapter_finder import AdapterFinder, Source
from graftlm.engine.admission import FairQueue, Placed
from graftlm.engine.json_mode import JsonConstraint, JsonVocab
from graftlm.engine.kv_cache import RowKVCache
from graftlm.engine.sampling import SamplingParams
from graftlm.engine.sequence import Decoding, check_prompt
from graftlm.errors import GraftlmError
from graftlm.lora.batched import AdapterBatch
from graftlm.lora.config import AdapterError
from graftlm.lora.slots import AdapterSlots
from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


MAX_ADAPTER_WEIGHT = 10.0  # |weight| of one adapter in a mix


class EngineOverloadedError(GraftlmError):
    """More requests are waiting than the engine accepts (`max_waiting`, `max_queued_per_tenant`)."""


class TenantBusyError(EngineOverloadedError):
    """One tenant has `max_queued_per_tenant` requests in the engine already."""


class NonFiniteOutputError(GraftlmError):
    """A request's forward gave NaN or infinite logits (its adapter or mix is broken); it alone fails."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # rows decoded together (and KV rows allocated)
    max_len: int = 2048  # positions per row: prompt + output (cut to the model's context window)
    prefill_tokens: int = 256  # tokens per prefill forward: bounds how long newcomers stall running rows
    adapter_cache_mb: float = 1024.0  # adapter slots, in MB
    max_rank: int = 16  # the largest adapter rank the slots hold
    adapter_dtype: str = "bfloat16"  # how slots hold adapters: bfloat16 (as stored) or float32
    max_waiting: int = 10_000  # queued requests beyond this are refused
    max_queued_per_tenant: int = 4096  # one tenant's requests in the engine (waiting or running)
    strategy: str = "auto"  # how rows with different adapters are computed (see lora.batched)


@dataclass
class Output:
    """One event of a request: a token and the text it settled, the finish, or an error."""

    token: int | None
    delta: str
    finish_reason: str | None = None
    error: Exception | None = None


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    adapters: list[tuple[Source, float]]
    sink: Callable[[Output], None]
    finished_at: float | None = None
    token_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    json_mode: bool = False
    tenant: str = ""  # who asked (an API key's tenant): rows are shared fairly between tenants
    # engine-side state
    decoding: Decoding | None = None
    entries: list[Entry] = field(default_factory=list)
    tried: bool = False
    row: int = -1
    filled: int = 0  # positions of this row's KV holding real tokens
    last_token: int = 0
    alone: bool = False  # prefill it by itself: its packed prefill gave non-finite output

    def cancel(self) -> None:
        """Stop generating (client gone): the engine frees the row at its next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finished_at is not None


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
        self.device = model.device
        self.stop_ids = tokenizer.stop_ids(model.config.eos_token_id)
        self.pad_id = tokenizer.pad_id
        self.max_len = min(config.max_len, model.config.max_position_embeddings)
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[config.adapter_dtype]
        slot_bytes = AdapterSlots.slot_bytes(model, config.max_rank, dtype)
        n_slots = max(1, int(config.adapter_cache_mb * 2**20 // slot_bytes))
        self.slots = AdapterSlots(model, n_slots, config.max_rank, dtype)
        self.cache = AdapterCache(self.slots, adapters, force)
        self.cache.on_change = self._wake
        self.kv = RowKVCache(model.config, config.max_batch, self.max_len, model.dtype, self.device)
        self._incoming: deque[Request] = deque()
        self._waiting: FairQueue[Request] = FairQueue()
        self._open: Counter[str] = Counter()  # requests submitted and not finished, by tenant (under _cond)
        self.decoding: list[Request] = []
        self.prefilling: list[Request] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.tokens_generated = 0
        self.step_errors = 0
        self.peak_batch = 0
        # where the time goes (also exported by /metrics)
        self.decode_seconds = self.prefill_seconds = 0.0
        self.decode_steps = self.decode_rows = self.prefill_tokens = 0
        self._json: JsonVocab | None = None
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
        tenant: str = "",
    ) -> Request:
        """Queue a request; its outputs go to `sink` (called on the engine thread), see `run`.

        json_mode: constrain the output to a valid JSON object (see `graftlm.engine.json_mode`).
        tenant: who asks; tenants share the rows fairly (see `graftlm.engine.admission`).
        """
        check_prompt(prompt, self.max_len, "this server's context")
        for src, w in adapters:
            if not (math.isfinite(w) and abs(w) <= MAX_ADAPTER_WEIGHT):
                raise ValueError(
                    f"adapter {src.key} has weight {w}: a weight is a finite number within ±{MAX_ADAPTER_WEIGHT:g}"
                )
        req = Request(list(prompt), params, list(adapters), sink or (lambda o: None), json_mode=json_mode)
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

    def run_forever(self, until: Callable[[], bool] | None = None) -> None:
        """Run the engine loop on the calling thread until `stop()` or `until()` is true.

        Prefer the thread that loaded the model (the main thread): libgomp keeps one pool of worker
        threads per thread that runs parallel torch ops, and with two pools on a 2-core machine it stops
        spin-waiting between ops, which made every decode step about 30% slower here.
        """
        try:
            while not (until is not None and until()):
                with self._cond:
                    if self._stop:
                        break
                    self._take_incoming()
                    if not (self.decoding or self.prefilling or self._admissible()):
                        self._cond.wait(timeout=0.05)
                        continue
                try:
                    if not self._iterate():
                        with self._cond:  # only requests waiting for adapter loads: sleep until one lands
                            self._cond.wait(timeout=0.01)
                except Exception as e:  # a bug must fail the running requests, not the server
                    log.exception("engine step failed")
                    self.step_errors += 1
                    for req in self.decoding + self.prefilling:
                        self._finish(req, error=e)
                    self.decoding, self.prefilling = [], []
        finally:
            with self._cond:
                self._take_incoming()
            for req in self._waiting.remove(lambda r: False) + self.decoding + self.prefilling:
                self._finish(req, error=GraftlmError("the server is shutting down"))
            self.decoding, self.prefilling = [], []

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
        return len(self.decoding)

    # ---- the engine thread ---------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _take_incoming(self) -> None:
        while self._incoming:
            self._waiting.push(self._incoming.popleft())

    def _admissible(self) -> bool:
        return len(self._waiting) > 0 and len(self.decoding) + len(self.prefilling) < self.config.max_batch

    def _iterate(self) -> bool:
        """One engine step; False when there was nothing to run."""
        self._drop_cancelled()
        self._admit()
        if not (self.decoding or self.prefilling):
            return False
        with torch.inference_mode():
            if self.decoding:
                t0 = time.perf_counter()
                self.decode_rows += len(self.decoding)
                self.decode_steps += 1
                self._decode_step()
                self.decode_seconds += time.perf_counter() - t0
            if self.prefilling:
                t0 = time.perf_counter()
                self._prefill_step()
                self.prefill_seconds += time.perf_counter() - t0
        self.steps += 1
        return True

    def _drop_cancelled(self) -> None:
        for req in self._waiting.remove(lambda r: not r.cancelled):
            self._finish(req, reason="cancelled")
        gone = [r for r in self.decoding + self.prefilling if r.cancelled]
        for req in gone:
            self._finish(req, reason="cancelled")
        if gone:
            self._pack()

    def _admit(self) -> None:
        running = Counter(r.tenant for r in self.decoding + self.prefilling)
        free = self.config.max_batch - len(self.decoding) - len(self.prefilling)
        self._waiting.admit(free, self.config.max_batch, running, self._place)

    def _place(self, req: Request) -> Placed:
        """Give `req` a row if its adapters are resident; a request that cannot run fails alone."""
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
            constraint = JsonConstraint(self._json_vocab()) if req.json_mode else None
            req.decoding = Decoding(req.params, self.tokenizer, self.stop_ids, budget, self.device, constraint)
        except Exception as e:
            self._finish(req, error=e)  # releases its adapters
            return "gone"
        req.row, req.filled = len(self.decoding) + len(self.prefilling), 0
        self.prefilling.append(req)
        return "admitted"

    def _json_vocab(self) -> JsonVocab:
        if self._json is None:
            self._json = JsonVocab(self.tokenizer, self.model.config.vocab_size, self.stop_ids)
        return self._json

    def _adapter_batch(self, reqs: Sequence[Request], seq_len: int = 1) -> AdapterBatch | None:
        rows = [[(e.slot, w) for e, (_, w) in zip(r.entries, r.adapters, strict=True)] for r in reqs]
        if not any(rows):
            return None
        return AdapterBatch.of(rows, self.config.strategy, self.device, seq_len)

    def _decode_step(self) -> None:
        reqs = list(self.decoding)  # _choose removes finished requests from self.decoding
        self.peak_batch = max(self.peak_batch, len(reqs))
        pos = torch.tensor([r.filled for r in reqs], device=self.device)
        view = self.kv.decode(pos)
        mask = (torch.arange(view.end, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
        tokens = torch.tensor([[r.last_token] for r in reqs], device=self.device)
        logits = self.model(
            tokens, pos[:, None], view, 0, adapters=self._adapter_batch(reqs), attn_mask=mask, last_only=True
        )[:, -1]
        for r in reqs:
            r.filled += 1
        ok = torch.isfinite(logits).all(-1).tolist()
        if not all(ok):
            for r, fine in zip(reqs, ok, strict=True):
                if not fine:
                    self._fail_non_finite(r)
            self._pack()
            keep = [i for i, fine in enumerate(ok) if fine]
            reqs, logits = [reqs[i] for i in keep], logits[keep]
        self._choose(reqs, logits)

    def _prefill_step(self) -> None:
        first = self.prefilling[0]
        budget = self.config.prefill_tokens
        if first.filled > 0 or len(first.prompt) > budget or first.alone:
            self._prefill_chunk(first, budget)
            return
        # whole prompts, oldest first, packed end to end into one sequence: no padding
        group, total = [], 0
        for r in self.prefilling:
            if group and total + len(r.prompt) > budget:
                break
            group.append(r)
            total += len(r.prompt)
        # prompts with the same adapter side by side: each adapter then applies to one run of tokens
        # with plain GEMMs (rows not yet written, so reordering them copies nothing)
        group.sort(key=lambda r: tuple(e.slot for e in r.entries))
        self.prefilling = group + self.prefilling[len(group) :]
        self._pack()
        lengths = [len(r.prompt) for r in group]
        tokens = torch.tensor([[t for r in group for t in r.prompt]], device=self.device)  # [1, T]
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])[None]
        segment = torch.repeat_interleave(torch.arange(len(group), device=self.device), torch.tensor(lengths))
        # block-diagonal causal mask: each prompt sees only itself
        mask = (segment[:, None] == segment[None, :]) & (positions[0][None, :] <= positions[0][:, None])
        view = self.kv.packed(group[0].row, lengths)
        adapters = self._adapter_batch([r for r, n in zip(group, lengths, strict=True) for _ in range(n)])
        if adapters is not None:
            adapters.token_level = True
        self.prefill_tokens += total
        h = self.model.hidden(tokens, positions, view, 0, adapters=adapters, attn_mask=mask[None, None])
        last = torch.tensor(lengths, device=self.device).cumsum(0) - 1
        for r in group:
            r.filled = len(r.prompt)
        logits = self.model.logits(h[0, last])
        ok = torch.isfinite(logits).all(-1).tolist()
        if not all(ok):  # NaN in one prompt's keys reaches every prompt packed with it: retry each alone
            for r, fine in zip(group, ok, strict=True):
                if not fine:
                    self.kv.clear(r.row, r.filled)
                    r.filled, r.alone = 0, True
            keep = [i for i, fine in enumerate(ok) if fine]
            group, logits = [group[i] for i in keep], logits[keep]
        self._prefilled(group, logits)

    def _prefill_chunk(self, req: Request, budget: int) -> None:
        """The next chunk of a prompt longer than the budget, attending to the chunks before it."""
        start = req.filled
        chunk = req.prompt[start : start + budget]
        tokens = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        self.prefill_tokens += len(chunk)
        h = self.model.hidden(
            tokens, positions, self.kv.chunk(req.row, 1), start, adapters=self._adapter_batch([req], len(chunk))
        )
        req.filled += len(chunk)
        if req.filled == len(req.prompt):
            logits = self.model.logits(h[0, -1:])
            if not bool(torch.isfinite(logits).all()):
                self._fail_non_finite(req)
                self._pack()
                return
            self._prefilled([req], logits)

    def _prefilled(self, done: list[Request], logits: torch.Tensor) -> None:
        # the prefilled rows join the decoding ones; they are the first prefilling rows, but for any set
        # back to prefill alone (then `_pack` moves them down and the set-back rows, empty, after them)
        self.prefilling = [r for r in self.prefilling if not any(r is d for d in done)]
        self.decoding.extend(done)
        self._pack()
        if done:
            self._choose(done, logits)

    def _fail_non_finite(self, req: Request) -> None:
        """Fail a row whose output was NaN or infinite, zeroing its KV first: stale positions of a row are
        hidden by later requests' masks, and a masked 0 times NaN would still be NaN."""
        self.kv.clear(req.row, req.filled)
        self._finish(
            req,
            error=NonFiniteOutputError(
                "the model's output for this request is not finite (NaN or infinity): its adapter or mix is "
                "broken; other requests are unaffected"
            ),
        )

    def _choose(self, reqs: Sequence[Request], logits: torch.Tensor) -> None:
        greedy = [r.decoding.params.greedy and r.decoding.constraint is None for r in reqs]
        picks = logits.argmax(-1).tolist() if any(greedy) else []
        finished = False
        for i, r in enumerate(reqs):
            try:
                tok = picks[i] if greedy[i] else r.decoding.choose(logits[i])
                got = r.decoding.accept(tok)
            except Exception as e:  # this row's settings or text: fail it alone
                log.warning("request failed choosing its token: %s", e)
                self._finish(r, error=e)
                finished = True
                continue
            r.last_token = tok
            r.token_ids.append(tok)
            self.tokens_generated += 1
            if got.finish_reason is None:
                r.sink(Output(tok, got.delta))
            else:
                self._finish(r, reason=got.finish_reason, token=tok, delta=got.delta)
                finished = True
        if finished:  # _finish took them out of self.decoding
            self._pack()

    def _finish(
        self,
        req: Request,
        reason: str | None = None,
        error: Exception | None = None,
        token: int | None = None,
        delta: str = "",
    ) -> None:
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
        if req.entries:
            self.cache.release(req.entries)
            req.entries = []
        if req in self.decoding:
            self.decoding.remove(req)
        if req in self.prefilling:
            self.prefilling.remove(req)
        if reason == "stop" and token in self.stop_ids and req.token_ids and req.token_ids[-1] == token:
            req.token_ids.pop()  # the EOS token is not part of the answer
        try:
            req.sink(Output(token, delta, reason, error))
        except Exception:  # a sink that fails (client gone) must not stop the engine
            log.exception("delivering the end of a request")

    def _pack(self) -> None:
        """Give rows in list order: decoding rows 0..n-1, then prefilling ones. Rows holding KV only ever
        move down (in order, so no row is overwritten before it has moved); empty ones move freely."""
        for target, req in enumerate(self.decoding + self.prefilling):
            if req.row != target:
                if req.filled:
                    if req.row < target:
                        raise RuntimeError(f"row {req.row} holding KV would move up to {target}")
                    self.kv.move(req.row, target, req.filled)
                req.row = target
