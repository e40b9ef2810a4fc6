"""Which requests hold rows, in which order, and what each engine step runs.

Requests wait in a `FairQueue` (tenants take turns) until admitted; an admitted request holds one KV
row from then to its finish. Decoding rows sit at 0..n-1 and prefilling rows after them, so a decode
step reads plain views; when a row leaves, later rows move down (a copy of their filled positions).
A step decodes every decoding row, then prefills at most `prefill_tokens` prompt tokens: several
whole prompts packed end to end (no padding), or the next chunk of one long prompt, so a newcomer
stalls the running rows for one bounded chunk only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from graftlm.engine.admission import FairQueue, Placed
from graftlm.engine.kv_cache import RowKVCache
from graftlm.engine.request import Request


@dataclass
class Prefill:
    """What the next prefill forward takes in: whole prompts packed end to end, or one prompt's chunk."""

    reqs: list[Request]
    packed: bool
    start: int = 0  # a chunk's first position
    length: int = 0  # a chunk's tokens


class Scheduler:
    def __init__(self, kv: RowKVCache, max_batch: int, prefill_tokens: int):
        self.kv, self.max_batch, self.prefill_tokens = kv, max_batch, prefill_tokens
        self.waiting: FairQueue[Request] = FairQueue()
        self.decoding: list[Request] = []
        self.prefilling: list[Request] = []

    @property
    def running(self) -> list[Request]:
        return self.decoding + self.prefilling

    def has_room(self) -> bool:
        return len(self.waiting) > 0 and len(self.decoding) + len(self.prefilling) < self.max_batch

    def take_cancelled(self) -> list[Request]:
        """Every cancelled request, waiting or running, out of the queues (rows packed after)."""
        gone = self.waiting.remove(lambda r: not r.cancelled)
        running = [r for r in self.running if r.cancelled]
        for r in running:
            self.remove(r)
        if running:
            self.pack()
        return gone + running

    def take_all(self) -> list[Request]:
        """Every request, for shutdown."""
        everyone = self.waiting.remove(lambda r: False) + self.running
        self.decoding, self.prefilling = [], []
        return everyone

    def admit(self, place: Callable[[Request], Placed]) -> None:
        """Give free rows to waiting requests, tenants in turn; `place` readies a request (its adapters,
        its decoding state) and says whether it can run now, must wait, or failed."""

        def give_row(req: Request) -> Placed:
            placed = place(req)
            if placed == "admitted":
                req.row, req.filled = len(self.decoding) + len(self.prefilling), 0
                self.prefilling.append(req)
            return placed

        running = Counter(r.tenant for r in self.running)
        free = self.max_batch - len(self.decoding) - len(self.prefilling)
        self.waiting.admit(free, self.max_batch, running, give_row)

    def next_prefill(self) -> Prefill:
        """The next prefill: the first prompt's next chunk when it is long (or must go alone), else as
        many whole prompts as fit, oldest first, with prompts of the same adapter side by side."""
        first = self.prefilling[0]
        if first.filled > 0 or len(first.prompt) > self.prefill_tokens or first.alone:
            length = min(self.prefill_tokens, len(first.prompt) - first.filled)
            return Prefill([first], packed=False, start=first.filled, length=length)
        group, total = [], 0
        for r in self.prefilling:
            if group and (total + len(r.prompt) > self.prefill_tokens or r.filled):  # r.filled: a cached prefix
                break
            group.append(r)
            total += len(r.prompt)
        # each adapter then applies to one run of tokens with plain GEMMs (rows not yet written, so
        # reordering them copies nothing)
        group.sort(key=lambda r: tuple(e.slot for e in r.entries))
        self.prefilling = group + self.prefilling[len(group) :]
        self.pack()
        return Prefill(group, packed=True)

    def prefilled(self, done: list[Request]) -> None:
        """`done` finished their prompts: they join the decoding rows. They are the first prefilling rows,
        but for any set back to prefill alone (which `pack` then moves after them, empty)."""
        self.prefilling = [r for r in self.prefilling if not any(r is d for d in done)]
        self.decoding.extend(done)
        self.pack()

    def set_back(self, req: Request) -> None:
        """Prefill `req` again, alone (its packed prefill gave non-finite output); its row is zeroed."""
        self.kv.clear(req.row, req.filled)
        req.filled, req.alone = 0, True

    def remove(self, req: Request) -> None:
        """Take a finished request out of the running rows (call `pack` after)."""
        if req in self.decoding:
            self.decoding.remove(req)
        if req in self.prefilling:
            self.prefilling.remove(req)

    def pack(self) -> None:
        """Give rows in list order: decoding rows 0..n-1, then prefilling ones. Rows holding KV only ever
        move down (in order, so no row is overwritten before it has moved); empty ones move freely."""
        for target, req in enumerate(self.decoding + self.prefilling):
            if req.row != target:
                if req.filled:
                    if req.row < target:
                        raise RuntimeError(f"row {req.row} holding KV would move up to {target}")
                    self.kv.move(req.row, target, req.filled)
                req.row = target
