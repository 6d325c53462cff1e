"""Exact, deterministic 1-D k-means (Lloyd's algorithm over sorted values).

In one dimension every k-means cluster is a contiguous interval of the sorted values, so after
one sort and two float64 prefix sums (of values and of squares) an assignment step is a
``searchsorted`` of the ``k - 1`` midpoints between centres and an update step is ``k`` prefix-sum
differences: an iteration costs ``O(k log n)`` instead of ``O(k n)``. Lloyd runs from a few
deterministic starts (quantiles, equal-width cells and the outlier-seeking k-means++-style
farthest-point seed) and the lowest inertia wins. No randomness: the same values give the same
centres on every run.

Rows are independent problems: ``values`` of shape ``(G, n)`` gives ``G`` clusterings at once
(``G = 1`` for a whole tensor, ``G = rows`` for per-output-channel clustering).

Convention: a value ``v`` belongs to cluster ``j`` when ``b[j - 1] < v <= b[j]`` for the sorted
boundaries ``b`` (midpoints between consecutive centres), i.e. ``j = searchsorted(b, v, left)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KMeans1D", "assign_clusters", "kmeans_1d"]

_MAX_ITER = 300


@dataclass(frozen=True)
class KMeans1D:
    """Result of :func:`kmeans_1d` for ``G`` independent rows.

    Attributes:
        centers: ``(G, k)`` float64, sorted ascending. A cluster that holds no value keeps a
            finite centre, so boundaries never contain NaN.
        boundaries: ``(G, k - 1)`` float64, midpoints between consecutive centres.
        counts: ``(G, k)`` int64, values per cluster.
        inertia: ``(G,)`` float64, sum of squared distances to the assigned centre.
    """

    centers: torch.Tensor
    boundaries: torch.Tensor
    counts: torch.Tensor
    inertia: torch.Tensor


def kmeans_1d(values: torch.Tensor, k: int, max_iter: int = _MAX_ITER) -> KMeans1D:
    """Cluster each row of ``values`` (shape ``(G, n)`` or ``(n,)``) into ``k`` intervals."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    x = values.detach()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"kmeans_1d expects a 1-D or 2-D tensor, got shape {tuple(values.shape)}")
    if x.is_complex() or not x.is_floating_point():
        x = x.to(torch.float64)
    rows, n = x.shape
    if n == 0:
        raise ValueError("kmeans_1d needs at least one value per row")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("kmeans_1d got NaN or infinite values")
    # contiguous: sort keeps a transposed input's strides, and searchsorted warns on (and copies) those
    s = torch.sort(x.to(torch.float64), dim=1).values.contiguous()
    zero = torch.zeros(rows, 1, dtype=torch.float64, device=s.device)
    psum = torch.cat([zero, torch.cumsum(s, dim=1)], dim=1)
    psq = torch.cat([zero, torch.cumsum(s * s, dim=1)], dim=1)

    best: tuple[torch.Tensor, torch.Tensor] | None = None
    for init in _initial_centers(s, k):
        centers, inertia = _lloyd(s, psum, psq, init, max_iter)
        if best is None:
            best = (centers, inertia)
        else:
            better = inertia < best[1]
            best = (
                torch.where(better.unsqueeze(1), centers, best[0]),
                torch.where(better, inertia, best[1]),
            )
    assert best is not None
    centers, inertia = best
    bounds = _midpoints(centers)
    cuts = _cuts(s, bounds)
    return KMeans1D(centers=centers, boundaries=bounds, counts=cuts.diff(dim=1), inertia=inertia)


def assign_clusters(values: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Cluster id of each value: ``values`` ``(G, n)``, ``boundaries`` ``(G or 1, k - 1)`` -> int64 ``(G, n)``."""
    if boundaries.shape[-1] == 0:
        return torch.zeros(values.shape, dtype=torch.int64, device=values.device)
    b = boundaries.to(torch.float64)
    v = values.to(torch.float64)
    if b.shape[0] != v.shape[0]:
        b = b.expand(v.shape[0], -1)
    return torch.searchsorted(b.contiguous(), v.contiguous(), right=False)


def _midpoints(centers: torch.Tensor) -> torch.Tensor:
    return (centers[:, :-1] + centers[:, 1:]) * 0.5


def _cuts(s: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Start index of each cluster in the sorted rows, with 0 and n appended: ``(G, k + 1)``."""
    rows, n = s.shape
    inner = torch.searchsorted(s, bounds.contiguous(), right=True)
    return torch.cat(
        [
            torch.zeros(rows, 1, dtype=torch.int64, device=s.device),
            inner,
            torch.full((rows, 1), n, dtype=torch.int64, device=s.device),
        ],
        dim=1,
    )


def _lloyd(
    s: torch.Tensor, psum: torch.Tensor, psq: torch.Tensor, centers: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    cuts = _cuts(s, _midpoints(centers))
    for _ in range(max_iter):
        counts = cuts.diff(dim=1)
        sums = psum.gather(1, cuts[:, 1:]) - psum.gather(1, cuts[:, :-1])
        means = sums / counts.clamp(min=1)
        # An empty cluster keeps its centre; centres stay sorted because means of ordered
        # intervals are ordered, and an empty interval sits between its neighbours' values.
        centers = torch.where(counts > 0, means, centers)
        centers = torch.cummax(centers, dim=1).values
        new_cuts = _cuts(s, _midpoints(centers))
        if torch.equal(new_cuts, cuts):
            break
        cuts = new_cuts
    counts = cuts.diff(dim=1)
    sums = psum.gather(1, cuts[:, 1:]) - psum.gather(1, cuts[:, :-1])
    sq = psq.gather(1, cuts[:, 1:]) - psq.gather(1, cuts[:, :-1])
    means = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
    inertia = (sq - 2 * means * sums + counts * means * means).clamp(min=0).sum(dim=1)
    return means, inertia


def _initial_centers(s: torch.Tensor, k: int) -> list[torch.Tensor]:
    rows, n = s.shape
    lo, hi = s[:, :1], s[:, -1:]
    frac = (torch.arange(k, dtype=torch.float64, device=s.device) + 0.5) / k
    quantile_idx = (frac * (n - 1)).round().long().expand(rows, -1)
    starts = [s.gather(1, quantile_idx), lo + (hi - lo) * frac]
    if k > 1:
        starts.append(_farthest_point_centers(s, k))
    return [torch.cummax(c, dim=1).values for c in starts]


def _farthest_point_centers(s: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic k-means++-style seed: start at the median, add the value farthest from all centres."""
    n = s.shape[1]
    chosen = [s[:, n // 2 : n // 2 + 1]]
    for _ in range(k - 1):
        cur = torch.cat(chosen, dim=1)
        # The farthest value from a set of centres is one of the two ends of the sorted row.
        ends = torch.cat([s[:, :1], s[:, -1:]], dim=1)
        dist = (ends.unsqueeze(2) - cur.unsqueeze(1)).abs().amin(dim=2)
        pick = ends.gather(1, dist.argmax(dim=1, keepdim=True))
        chosen.append(pick)
    return torch.sort(torch.cat(chosen, dim=1), dim=1).values
