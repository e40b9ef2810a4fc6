"""Turns for rows: no tenant holds more than its share while another waits; alone, a tenant takes all."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from graftlm.engine.admission import FairQueue, Placed


@dataclass(eq=False)
class Req:
    tenant: str
    ready: bool = True  # False: its adapter is still loading


def admit(q: FairQueue[Req], free: int, running: Counter[str], max_batch: int = 8) -> list[Req]:
    got: list[Req] = []

    def place(r: Req) -> Placed:
        if not r.ready:
            return "wait"
        got.append(r)
        return "admitted"

    q.admit(free, max_batch, running, place)
    return got


def test_a_tenant_alone_takes_every_row_in_order() -> None:
    q: FairQueue[Req] = FairQueue()
    reqs = [Req("a") for _ in range(10)]
    for r in reqs:
        q.push(r)
    assert admit(q, 8, Counter()) == reqs[:8] and len(q) == 2


def test_no_tenant_passes_its_share_while_another_waits() -> None:
    q: FairQueue[Req] = FairQueue()
    for _ in range(20):
        q.push(Req("flood"))
    q.push(Req("quiet"))
    got = admit(q, 8, Counter())
    assert Counter(r.tenant for r in got) == {"flood": 7, "quiet": 1}  # quiet is served in its turn
    # flood holds 7 of 8 rows; quiet arrives again: the next free row is quiet's, not flood's
    q.push(Req("quiet"))
    got = admit(q, 1, Counter(flood=7))
    assert [r.tenant for r in got] == ["quiet"]
    # three tenants waiting on an empty batch of 9: three rows each
    q2: FairQueue[Req] = FairQueue()
    for t in "abc":
        for _ in range(5):
            q2.push(Req(t))
    assert Counter(r.tenant for r in admit(q2, 9, Counter(), max_batch=9)) == {"a": 3, "b": 3, "c": 3}


def test_a_waiting_request_lets_the_ones_behind_it_go_and_keeps_its_place() -> None:
    q: FairQueue[Req] = FairQueue()
    slow, fast = Req("a", ready=False), Req("a")
    q.push(slow)
    q.push(fast)
    assert admit(q, 4, Counter()) == [fast] and list(q) == [slow]
    slow.ready = True
    assert admit(q, 4, Counter()) == [slow] and len(q) == 0


def test_remove_takes_out_what_is_not_kept() -> None:
    q: FairQueue[Req] = FairQueue()
    reqs = [Req(t) for t in "abab"]
    for r in reqs:
        q.push(r)
    gone = q.remove(lambda r: r.tenant == "a")
    assert gone == [reqs[1], reqs[3]] and list(q) == [reqs[0], reqs[2]] and q.waiting("b") == 0
