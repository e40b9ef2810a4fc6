"""Weighted one-dimensional k-means, run on many groups of values at once.

In one dimension the clusters of sorted centroids are intervals, so assigning a value is a binary search
among the midpoints between centroids (`searchsorted`) instead of a distance to every centroid: the cost
is O(n log k) per iteration whatever k is, which keeps 8-bit tables (k = 256) cheap. With importance
weights this is the sensitivity-weighted k-means of SqueezeLLM (Kim et al., 2024): centroids are
weighted means, pulled towards the values whose error costs the most.
"""

from __future__ import annotations

import torch


def nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The index of the nearest centroid for every value. values [G, n], centroids [G, k] sorted."""
    mid = (centroids[:, 1:] + centroids[:, :-1]) / 2  # [G, k-1]
    return torch.searchsorted(mid.contiguous(), values.contiguous())


def _quantile_init(sorted_v: torch.Tensor, sorted_w: torch.Tensor, k: int) -> torch.Tensor:
    """Centroids at the weighted quantiles (i + 1/2) / k of each group. [G, n] sorted -> [G, k]."""
    cdf = torch.cumsum(sorted_w, dim=1)
    cdf = cdf / cdf[:, -1:].clamp_min(1e-30)
    q = (torch.arange(k, dtype=cdf.dtype, device=cdf.device) + 0.5) / k
    pos = torch.searchsorted(cdf.contiguous(), q.expand(cdf.shape[0], k).contiguous())
    return torch.gather(sorted_v, 1, pos.clamp_max(sorted_v.shape[1] - 1))


def _exact(sorted_v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups with at most k distinct values: those values (padded with the largest) as centroids."""
    new = torch.ones_like(sorted_v, dtype=torch.bool)
    new[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    distinct = new.sum(1)  # [G]
    few = distinct <= k
    cents = torch.empty(sorted_v.shape[0], k, dtype=sorted_v.dtype, device=sorted_v.device)
    for g in few.nonzero().squeeze(1).tolist():
        u = sorted_v[g][new[g]]
        cents[g, : u.numel()] = u
        cents[g, u.numel() :] = u[-1]
    return few, cents


def kmeans(
    values: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each group's values into k centroids, minimising Σ w·(v − c)² (Lloyd's algorithm).

    values [G, n] float32, weights [G, n] ≥ 0 or None (all 1). Returns (centroids [G, k] sorted
    ascending, assignments [G, n] int64). Groups with at most k distinct values are reproduced exactly.
    Each iteration works on the sorted values: a cluster is the run between two midpoints, and its mass
    and weighted sum are differences of prefix sums, so an iteration costs O(k log n) per group.
    """
    values = values.float()
    g, n = values.shape
    w = torch.ones_like(values) if weights is None else weights.float().clamp_min(0) + 1e-12
    sorted_v, order = torch.sort(values, dim=1)
    sorted_w = torch.gather(w, 1, order)
    cents = _quantile_init(sorted_v, sorted_w, k)
    zero = torch.zeros(g, 1, dtype=torch.float64, device=values.device)
    cum_w = torch.cat([zero, torch.cumsum(sorted_w.double(), 1)], 1)  # [G, n+1]
    cum_wv = torch.cat([zero, torch.cumsum((sorted_w * sorted_v).double(), 1)], 1)
    ends = torch.full((g, 1), n, dtype=torch.int64, device=values.device)
    bounds = None
    for _ in range(iters):
        mid = (cents[:, 1:] + cents[:, :-1]) / 2  # [G, k-1]
        cut = torch.searchsorted(sorted_v, mid.contiguous())  # first sorted value above each midpoint
        if bounds is not None and torch.equal(cut, bounds):
            break
        bounds = cut
        edges = torch.cat([torch.zeros_like(ends), cut, ends], 1)  # [G, k+1] cluster c = [edges[c], edges[c+1])
        mass = cum_w.gather(1, edges[:, 1:]) - cum_w.gather(1, edges[:, :-1])
        total = cum_wv.gather(1, edges[:, 1:]) - cum_wv.gather(1, edges[:, :-1])
        updated = torch.where(mass > 0, total / mass.clamp_min(1e-300), cents.double()).float()
        cents = torch.sort(updated, dim=1).values  # an empty cluster keeps its centroid
    few, exact = _exact(sorted_v, k)
    if bool(few.any()):
        cents = torch.where(few[:, None], exact, cents)
    return cents, nearest(values, cents)
