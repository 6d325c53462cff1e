"""Partitions and their result: the :class:`KMeans1D` record, cuts of sorted rows turned into
centres, counts and inertia, and boundaries turned back into cluster ids (:func:`assign_clusters`).

Convention: a value ``v`` belongs to cluster ``j`` when ``b[j - 1] < v <= b[j]`` for the sorted
boundaries ``b`` (midpoints between consecutive centres), i.e. ``j = searchsorted(b, v, left)``.
Empty clusters (fewer distinct values than ``k``) come last and repeat the largest centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bounds import _F64, _NEG, _val

__all__ = ["KMeans1D", "assign_clusters"]

_COMPARE_MAX = 7  # assign_clusters: at most this many boundaries are compared one by one, more are searched


@dataclass(frozen=True)
class KMeans1D:
    """Result of :func:`kmeans_1d` for ``G`` independent rows.

    Attributes:
        centers: ``(G, k)`` float64, sorted ascending; an empty cluster (fewer distinct values than
            ``k``) repeats the largest centre, so boundaries never contain NaN.
        boundaries: ``(G, k - 1)`` float64, midpoints between consecutive centres.
        counts: ``(G, k)`` int64, values per cluster.
        inertia: ``(G,)`` float64, sum of squared distances to the assigned centre.
    """

    centers: torch.Tensor
    boundaries: torch.Tensor
    counts: torch.Tensor
    inertia: torch.Tensor


def assign_clusters(values: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Cluster id of each value: ``values`` ``(G, n)``, ``boundaries`` ``(G or 1, k - 1)`` -> int64 ``(G, n)``."""
    if boundaries.shape[-1] == 0:
        return torch.zeros(values.shape, dtype=torch.int64, device=values.device)
    b = boundaries.to(_F64)
    if b.shape[-1] > _COMPARE_MAX:
        v = values.to(_F64)
        if b.shape[0] != v.shape[0]:
            b = b.expand(v.shape[0], -1)
        return torch.searchsorted(b.contiguous(), v.contiguous(), right=False)
    # id = number of boundaries below the value, one comparison pass per boundary
    if values.dtype == torch.float32:
        # v > b  <=>  v >= c, c the smallest float32 above b: exact, without a float64 copy of the values
        c = b.to(torch.float32)
        v, t, above = values, torch.where(c.to(_F64) > b, c, c.nextafter(torch.full_like(c, torch.inf))), torch.ge
    else:
        v, t, above = values.to(_F64), b, torch.gt
    ids = above(v, t[:, :1]).to(torch.int64)
    for j in range(1, t.shape[1]):
        ids.add_(above(v, t[:, j : j + 1]))
    return ids


def _midpoints(centers: torch.Tensor) -> torch.Tensor:
    """Boundaries ``(G, k - 1)`` between consecutive centres ``(G, k)``."""
    return (centers[:, :-1] + centers[:, 1:]) * 0.5


def _canonical(counts: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty clusters move to the end and repeat the last centre; the others' centres are means."""
    order = torch.sort((counts == 0).to(torch.int8), dim=1, stable=True).indices
    counts = counts.gather(1, order)
    sums = sums.gather(1, order)
    ne = counts > 0
    means = sums / counts.clamp(min=1)
    return counts, sums, torch.where(ne, means, torch.where(ne, means, _NEG).cummax(1).values)


def _sorted_prefix(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (float64 ``(G, n)``) sorted, with prefix sums of the values and of their squares ``(G, n + 1)``."""
    s = torch.sort(x, dim=1).values.contiguous()
    z = torch.zeros(s.shape[0], 1, dtype=_F64, device=x.device)
    return s, torch.cat([z, s.cumsum(1)], 1), torch.cat([z, (s * s).cumsum(1)], 1)


def _finish_sorted(
    s: torch.Tensor, sc: torch.Tensor, qc: torch.Tensor, cuts: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres, counts and inertia of sorted rows ``s`` cut after ``cuts`` values (int64 ``(G, k - 1)``), the
    boundaries moved until they reproduce the partition (``max_iter`` passes at most); ``sc``, ``qc``: prefix sums."""
    g, n = s.shape
    zero = torch.zeros(g, 1, dtype=torch.int64, device=s.device)
    full = torch.full((g, 1), n, dtype=torch.int64, device=s.device)
    bidx = torch.cat([zero, cuts, full], 1)
    for _ in range(max_iter + 1):
        counts, _, centers = _canonical(bidx.diff(dim=1), sc.gather(1, bidx).diff(dim=1))
        bidx = torch.cat([zero, counts.cumsum(1)], 1)
        new = torch.cat([zero, torch.searchsorted(s, _midpoints(centers).contiguous(), right=True), full], 1)
        if torch.equal(new, bidx):
            break
        bidx = new
    counts, sums, centers = _canonical(bidx.diff(dim=1), sc.gather(1, bidx).diff(dim=1))
    bidx = torch.cat([zero, counts.cumsum(1)], 1)
    inertia = (qc.gather(1, bidx).diff(dim=1) - _val(counts.to(_F64), sums)).clamp(min=0).sum(dim=1)
    return centers, counts, inertia
