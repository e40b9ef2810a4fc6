"""Routing requests across serving replicas: a discrete-event simulation of adapter-affinity routing.

What it models: R serving replicas, each an engine with an LRU adapter cache holding C adapters, serving
requests for A adapters whose popularity follows a power law (adapter k, counted from 1, is asked for with
probability proportional to k**-s, Zipf exponent s). Requests arrive as one Poisson stream of rate
`--rate` x R (the rate is per replica, so each grid point loads its replicas the same). Each replica
serves its queue first come, first served; a request takes an exponential service time (mean `--service`
ms), and a cold load (its adapter not in the replica's cache) adds `--load-ms` to it and holds the
replica meanwhile. A request whose adapter an earlier request in the same queue is loading counts as a hit
(graftlm makes one load for every request waiting on it). A replica's load is its queue length (requests
waiting or in service).

Routers, given the queue length of every replica when a request arrives:
- `random`: a replica chosen uniformly;
- `affinity`, as Ray Serve model multiplexing routes: among the replicas that hold the request's adapter,
  the least loaded; if none holds it, or (with `--spill N`, N > 0) the least loaded holder already has N
  requests, the least loaded replica overall, which then loads it (ties broken at random). Ray Serve
  leaves the holders only when they are at `max_ongoing_requests`; graftlm's deployment sets that to
  100,000 (server/ray_serve.py), which the default `--spill 0` models;
- `hash`: consistent hashing of the adapter's name onto a ring of replicas (`--vnodes` points each).

Every router at a grid point sees the same requests (arrival times, adapters, service times). The first
`--warmup` fraction of requests fills the caches and is not counted. Reported per router: cache hit rate,
cold loads per second, mean queueing delay, mean and p99 latency (arrival to finish), the max/min ratio of
the replicas' time-averaged queue lengths, and the busiest replica's utilisation (at 1.00 it is overloaded
and its latency grows with the run). Each grid point also gets the hit rate of one LRU cache of R x C
adapters on the same stream (the capacity the replicas hold together) and affinity's ratios to random.

What it leaves out: the network and the router's own cost; real load times (graftlm's measured cold load
of a rank-16 adapter is in benchmarks/README.md, "Serving"); continuous batching (a replica here serves
one request at a time, so service time stands for a replica's time per request at its batch size); that
graftlm loads an adapter on a separate thread while other rows decode (here a cold load holds the
replica: an upper bound on its cost); that graftlm never evicts an adapter a running request holds; Ray
Serve's power-of-two sampling, its staleness in learning which replica holds what, and its fallback to the
replicas holding the fewest adapters (here: the least loaded); adapter mixes; requests for the base model.

    python benchmarks/routing.py [--replicas 1 2 4 8 16] [--adapters 100 1000 10000] [--cache 64]
        [--zipf 1.1] [--rate 15] [--service 20] [--load-ms 50] [--spill 0] [--requests 100000]
        [--warmup 0.2] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import itertools
import json
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROUTERS = ("random", "affinity", "hash")
console = Console(width=120)


@dataclass(frozen=True)
class Workload:
    arrivals: list[float]  # seconds
    adapters: list[int]  # popularity rank, 0 the most asked for
    service: list[float]  # seconds, without any cold load


@dataclass
class Result:
    replicas: int
    adapters: int
    router: str
    hit_rate: float
    cold_loads_per_s: float
    wait_ms: float
    mean_ms: float
    p99_ms: float
    imbalance: float  # max / min of the replicas' time-averaged queue lengths (inf: a replica got nothing)
    max_utilisation: float


def make_workload(n: int, replicas: int, n_adapters: int, args: argparse.Namespace) -> Workload:
    """The request stream of one grid point: the same for every router (its own seed per grid point)."""
    rng = random.Random(f"{args.seed}/{replicas}/{n_adapters}")
    total_rate = args.rate * replicas
    t, arrivals = 0.0, []
    for _ in range(n):
        t += rng.expovariate(total_rate)
        arrivals.append(t)
    cum = list(itertools.accumulate((k + 1) ** -args.zipf for k in range(n_adapters)))
    adapters = rng.choices(range(n_adapters), cum_weights=cum, k=n)
    mean_s = args.service / 1000
    service = [rng.expovariate(1 / mean_s) for _ in range(n)]
    return Workload(arrivals, adapters, service)


def ring_owner(replicas: int, n_adapters: int, vnodes: int) -> list[int]:
    """Each adapter's replica under consistent hashing of its name (blake2b, `vnodes` points per replica)."""

    def h(s: str) -> int:
        return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")

    ring = sorted((h(f"replica-{r}#{v}"), r) for r in range(replicas) for v in range(vnodes))
    points = [p for p, _ in ring]
    owners = []
    for a in range(n_adapters):
        i = bisect.bisect(points, h(f"adapter-{a}")) % len(ring)
        owners.append(ring[i][1])
    return owners


def simulate(w: Workload, replicas: int, n_adapters: int, router: str, args: argparse.Namespace) -> Result:
    rng = random.Random(f"{args.seed}/{replicas}/{n_adapters}/{router}")
    cap, load_s, spill = args.cache, args.load_ms / 1000, args.spill
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]
    holders: dict[int, set[int]] = {}  # adapter -> the replicas whose cache holds it
    queue: list[deque[float]] = [deque() for _ in range(replicas)]  # finish times of the requests in each replica
    free_at = [0.0] * replicas  # when each replica finishes what it has
    owners = ring_owner(replicas, n_adapters, args.vnodes) if router == "hash" else []

    def qlen(r: int, now: float) -> int:
        q = queue[r]
        while q and q[0] <= now:
            q.popleft()
        return len(q)

    def least_loaded(candidates: Iterable[int], now: float) -> tuple[int, int]:
        best, ties = math.inf, []
        for r in candidates:
            n = qlen(r, now)
            if n < best:
                best, ties = n, [r]
            elif n == best:
                ties.append(r)
        return (ties[0] if len(ties) == 1 else rng.choice(ties)), int(best)

    def affinity(a: int, now: float) -> int:
        held = holders.get(a)
        if held:
            r, n = least_loaded(sorted(held), now)
            if spill <= 0 or n < spill:
                return r
        return least_loaded(range(replicas), now)[0]

    choose: Callable[[int, float], int] = {
        "random": lambda a, now: rng.randrange(replicas),
        "affinity": affinity,
        "hash": lambda a, now: owners[a],
    }[router]

    n = len(w.arrivals)
    first = int(n * args.warmup)
    hits = loads = 0
    latencies: list[float] = []
    wait = 0.0
    sojourn = [0.0] * replicas  # summed over the counted requests: time-averaged queue length x window
    busy = [0.0] * replicas
    for i in range(n):
        t, a = w.arrivals[i], w.adapters[i]
        r = choose(a, t)
        cache = caches[r]
        hit = a in cache
        if hit:
            cache.move_to_end(a)
        else:
            cache[a] = None
            holders.setdefault(a, set()).add(r)
            if len(cache) > cap:
                gone, _ = cache.popitem(last=False)
                holders[gone].discard(r)
        start = max(t, free_at[r])
        took = w.service[i] + (0.0 if hit else load_s)
        done = free_at[r] = start + took
        queue[r].append(done)
        if i >= first:
            hits += hit
            loads += not hit
            latencies.append(done - t)
            wait += start - t
            sojourn[r] += done - t
            busy[r] += took
    window = w.arrivals[-1] - w.arrivals[first]
    counted = n - first
    latencies.sort()
    p99 = latencies[min(counted - 1, math.ceil(0.99 * counted) - 1)]
    lo, hi = min(sojourn), max(sojourn)
    return Result(
        replicas,
        n_adapters,
        router,
        hit_rate=hits / counted,
        cold_loads_per_s=loads / window,
        wait_ms=wait / counted * 1000,
        mean_ms=sum(latencies) / counted * 1000,
        p99_ms=p99 * 1000,
        imbalance=hi / lo if lo > 0 else math.inf,
        max_utilisation=min(1.0, max(busy) / window),
    )


def pooled_hit_rate(w: Workload, capacity: int, warmup: float) -> float:
    """Hit rate of one LRU cache of `capacity` adapters on the whole stream (no replicas)."""
    cache: OrderedDict[int, None] = OrderedDict()
    first, hits = int(len(w.adapters) * warmup), 0
    for i, a in enumerate(w.adapters):
        if a in cache:
            cache.move_to_end(a)
            hits += i >= first
        else:
            cache[a] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits / (len(w.adapters) - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--adapters", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--cache", type=int, default=64, help="adapters each replica's cache holds")
    ap.add_argument("--zipf", type=float, default=1.1, help="popularity exponent s: adapter k asked for ~ k**-s")
    ap.add_argument("--rate", type=float, default=15.0, help="arrivals per second per replica (total: x replicas)")
    ap.add_argument("--service", type=float, default=20.0, help="mean service time of a request, ms (exponential)")
    ap.add_argument("--load-ms", type=float, default=50.0, help="a cold load's added time, ms")
    ap.add_argument("--spill", type=int, default=0, help="affinity: leave the holders at this queue length (0: never)")
    ap.add_argument("--vnodes", type=int, default=64, help="hash: points per replica on the ring")
    ap.add_argument("--requests", type=int, default=100_000, help="requests per grid point")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the requests not counted")
    ap.add_argument("--routers", nargs="+", choices=ROUTERS, default=list(ROUTERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the settings and results here")
    args = ap.parse_args()
    if not 0 <= args.warmup < 1 or args.requests < 10 or args.cache < 1:
        ap.error("need 0 <= --warmup < 1, --requests >= 10 and --cache >= 1")

    t0 = time.perf_counter()
    results: list[Result] = []
    pooled: dict[str, float] = {}
    lines = []
    for n_adapters in args.adapters:
        for replicas in args.replicas:
            w = make_workload(args.requests, replicas, n_adapters, args)
            got = {router: simulate(w, replicas, n_adapters, router, args) for router in args.routers}
            results.extend(got.values())
            pooled[f"{replicas}x{n_adapters}"] = p = pooled_hit_rate(w, replicas * args.cache, args.warmup)
            line = f"R={replicas:<2} A={n_adapters:<5} one LRU of R x C: hit {p:.3f}"
            if "affinity" in got and "random" in got:
                aff, rnd = got["affinity"], got["random"]
                load_ratio = aff.cold_loads_per_s / rnd.cold_loads_per_s if rnd.cold_loads_per_s else math.nan
                line += (
                    f"; affinity / random: hit rate {aff.hit_rate / rnd.hit_rate:.2f}x "
                    f"({aff.hit_rate:.3f} / {rnd.hit_rate:.3f}), cold loads/s {load_ratio:.2f}x "
                    f"({aff.cold_loads_per_s:.1f} / {rnd.cold_loads_per_s:.1f})"
                )
            lines.append(line)
    seconds = time.perf_counter() - t0

    table = Table(
        title=(
            f"{args.requests:,} requests per point ({args.warmup:.0%} warm-up), Poisson {args.rate:g}/s per replica, "
            f"service {args.service:g} ms, cold load {args.load_ms:g} ms, cache {args.cache} per replica, "
            f"Zipf {args.zipf:g}" + (f", spill at {args.spill}" if args.spill > 0 else "")
        )
    )
    for col in ("R", "A", "router", "hit rate", "cold loads/s", "wait ms", "mean ms", "p99 ms", "load max/min"):
        table.add_column(col, justify="right")
    table.add_column("busiest", justify="right")
    for r in results:
        table.add_row(
            str(r.replicas),
            str(r.adapters),
            r.router,
            f"{r.hit_rate:.3f}",
            f"{r.cold_loads_per_s:.1f}",
            f"{r.wait_ms:.0f}",
            f"{r.mean_ms:.0f}",
            f"{r.p99_ms:.0f}",
            "inf" if math.isinf(r.imbalance) else f"{r.imbalance:.2f}",
            f"{r.max_utilisation:.2f}",
        )
    console.print(table)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"{seconds:.1f} s", highlight=False)
    if args.json is not None:
        doc = {
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": [asdict(r) | {"imbalance": None if math.isinf(r.imbalance) else r.imbalance} for r in results],
            "pooled_hit_rate": pooled,
            "seconds": round(seconds, 1),
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
