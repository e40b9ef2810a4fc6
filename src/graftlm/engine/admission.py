"""Who gets the next free row: waiting requests, one queue per tenant, served in turn.

A tenant may hold at most its share of the rows (`max_batch` over the tenants that have requests
running or waiting) while another tenant waits; with nobody else waiting it may take every free row.
Within a tenant, requests go first come, first served, except that one waiting for its adapter to load
lets the ones behind it go ahead. With one tenant (a server without keys) this is a plain FIFO.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, Literal, Protocol, TypeVar

Placed = Literal["admitted", "wait", "gone"]  # got a row / must keep waiting / left the queue (failed)


class HasTenant(Protocol):
    tenant: str


R = TypeVar("R", bound=HasTenant)


class FairQueue(Generic[R]):
    def __init__(self) -> None:
        self._queues: dict[str, deque[R]] = {}  # insertion order is the turn order

    def push(self, req: R) -> None:
        self._queues.setdefault(req.tenant, deque()).append(req)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[R]:
        for q in list(self._queues.values()):
            yield from list(q)

    def waiting(self, tenant: str) -> int:
        q = self._queues.get(tenant)
        return len(q) if q else 0

    def remove(self, keep: Callable[[R], bool]) -> list[R]:
        """Take out the requests `keep` says no to (cancelled ones); returns them."""
        gone: list[R] = []
        for tenant, q in list(self._queues.items()):
            stay = deque(r for r in q if keep(r) or gone.append(r))
            self._set(tenant, stay)
        return gone

    def admit(self, free: int, max_batch: int, running: Mapping[str, int], place: Callable[[R], Placed]) -> None:
        """Offer waiting requests to `place`, tenants in turn, until `free` rows are taken or nobody
        else can go. `running` counts each tenant's rows now."""
        held = dict(running)
        while free > 0:
            tenants = {t for t, n in held.items() if n} | set(self._queues)
            share = math.ceil(max_batch / max(1, len(tenants)))
            took = self._round(free, held, share, place)
            free -= took
            if not took:
                return

    def _round(self, free: int, held: dict[str, int], share: int, place: Callable[[R], Placed]) -> int:
        """One turn for each tenant with waiting requests; returns the rows taken."""
        taken = 0
        for tenant in list(self._queues):
            if taken >= free:
                break
            others_wait = any(q for t, q in self._queues.items() if t != tenant)
            if others_wait and held.get(tenant, 0) >= share:
                continue  # over its share while someone else waits
            if self._first(tenant, place):
                held[tenant] = held.get(tenant, 0) + 1
                taken += 1
                q = self._queues.pop(tenant, None)  # its turn is over: to the back of the line
                if q:
                    self._queues[tenant] = q
        return taken

    def _first(self, tenant: str, place: Callable[[R], Placed]) -> bool:
        """Admit the first request of `tenant` that can go; False if none can."""
        q = self._queues[tenant]
        stay: deque[R] = deque()
        admitted = False
        while q and not admitted:
            req = q.popleft()
            placed = place(req)
            if placed == "wait":
                stay.append(req)
            admitted = placed == "admitted"
        stay.extend(q)
        self._set(tenant, stay)
        return admitted

    def _set(self, tenant: str, q: deque[R]) -> None:
        if q:
            self._queues[tenant] = q
        else:
            self._queues.pop(tenant, None)
