"""The mixed-bit plan: a bit width for every weight so the model meets a bits-per-weight budget with the
least estimated loss.

Each weight has options (bits, storage, error), the error being the estimated loss of its palettization
at that width (sensitivity-weighted output error, scaled to a measured KL where `probe.py` measured one,
see `palettize._calibrate`). Choosing one option per weight to minimise total error under a storage
budget is a multiple-choice knapsack; its Lagrangian relaxation (each weight takes the option minimising
error + λ·storage, λ found by bisection) lands on the lower convex hull of every weight's options, and a
greedy pass then spends what is left of the budget on the upgrades with the best error saved per bit.
Storage counts everything honestly: packed indices with their row padding, float16 tables, and every
tensor that is not palettized at its stored width.
"""

from __future__ import annotations

from dataclasses import dataclass

# a plan may overshoot its target by this much when nothing smaller exists (tables and norms take room)
TOLERANCE = 0.05


@dataclass(frozen=True)
class Option:
    bits: int
    storage_bits: int  # indices + tables
    error: float  # Σ sensitivity · (W − Q)²
    rel_error: float  # ‖W − Q‖² / ‖W‖²


@dataclass(frozen=True)
class Plan:
    choice: dict[str, Option]  # by weight name
    fixed_bits: int  # tensors that are not palettized (norms, biases), at their stored width
    n_weights: int  # every parameter of the model, a tied embedding once

    @property
    def bits_per_weight(self) -> float:
        return (self.fixed_bits + sum(o.storage_bits for o in self.choice.values())) / self.n_weights

    def rows(self) -> list[dict[str, object]]:
        return [
            {"tensor": name, "bits": o.bits, "error": o.error, "rel_error": o.rel_error}
            for name, o in self.choice.items()
        ]


def _hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (storage, error), cheapest first."""
    pts = sorted(options, key=lambda o: (o.storage_bits, o.error))
    useful: list[Option] = []
    for o in pts:  # drop options that cost more and are no better
        if not useful or o.error < useful[-1].error:
            useful.append(o)
    hull: list[Option] = []
    for o in useful:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-o: never chosen by any λ
            if (b.error - a.error) * (o.storage_bits - a.storage_bits) >= (o.error - a.error) * (
                b.storage_bits - a.storage_bits
            ):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def _pick(hulls: dict[str, list[Option]], lam: float) -> dict[str, int]:
    return {n: min(range(len(h)), key=lambda i: h[i].error + lam * h[i].storage_bits) for n, h in hulls.items()}


def allocate(options: dict[str, list[Option]], fixed_bits: int, n_weights: int, target: float) -> Plan:
    """The plan of least total error whose bits per weight are at most `target` (see the module doc).

    With a single width for every weight there is nothing to choose: the plan is that width, whatever it
    costs (a uniform 4-bit model takes a little more than 4 bits with its tables).
    """
    if all(len({o.bits for o in opts}) == 1 for opts in options.values()):
        return Plan({n: o[0] for n, o in options.items()}, fixed_bits, n_weights)
    hulls = {n: _hull(o) for n, o in options.items()}
    budget = target * n_weights - fixed_bits

    def cost(pick: dict[str, int]) -> int:
        return sum(hulls[n][i].storage_bits for n, i in pick.items())

    cheapest = {n: 0 for n in hulls}
    if cost(cheapest) > budget:
        smallest = (cost(cheapest) + fixed_bits) / n_weights
        if smallest > target + TOLERANCE:
            raise ValueError(
                f"cannot reach {target} bits per weight: the smallest plan with these bit widths takes "
                f"{smallest:.3f} (tables and unpalettized tensors included)"
            )
        pick = cheapest
    else:
        lo, hi = 0.0, 1.0
        while cost(_pick(hulls, hi)) > budget:
            hi *= 4
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(_pick(hulls, mid)) > budget else (lo, mid)
        pick = _pick(hulls, hi)
        pick = _fill(hulls, pick, budget - cost(pick))
    return Plan({n: hulls[n][i] for n, i in pick.items()}, fixed_bits, n_weights)


def _fill(hulls: dict[str, list[Option]], pick: dict[str, int], left: float) -> dict[str, int]:
    """Spend the budget left on next-step upgrades, best error saved per bit first."""
    pick = dict(pick)
    while True:
        best, best_rate = None, 0.0
        for n, i in pick.items():
            if i + 1 >= len(hulls[n]):
                continue
            a, b = hulls[n][i], hulls[n][i + 1]
            extra = b.storage_bits - a.storage_bits
            if extra <= left and (a.error - b.error) / extra > best_rate:
                best, best_rate = n, (a.error - b.error) / extra
        if best is None:
            return pick
        i = pick[best]
        left -= hulls[best][i + 1].storage_bits - hulls[best][i].storage_bits
        pick[best] = i + 1
