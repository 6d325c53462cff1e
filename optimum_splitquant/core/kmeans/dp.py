"""Many clusters: the classic dynamic programme over sorted rows, each layer solved by divide and
conquer (the optimal last cut is monotone), ``O(k n log n)``; the pruning search grows fast with ``k``.
The layers run compiled (``kernels/kmeans_dp_cpu.cpp``, the same operations on the same prefix sums,
hence the same cuts) when the optional CPU kernels are built, else as vectorized torch.
"""

from __future__ import annotations

import math

import torch

from .bounds import _F64, _backtrack
from .partition import _finish_sorted, _sorted_prefix

__all__: list[str] = []


def _cluster_dc(x: torch.Tensor, k: int, max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres, counts and inertia of the optimal partition of each float64 row of ``x`` ``(G, n)``, by the DP."""
    s, sc, qc = _sorted_prefix(x)
    return _finish_sorted(s, sc, qc, _dc_cuts(s, k), max_iter)


def _dc_cuts(s: torch.Tensor, k: int) -> torch.Tensor:
    """Optimal cut counts ``(G, k - 1)`` of sorted float64 rows ``s`` ``(G, n)`` by dynamic programming.

    ``best_j[i]``: least SSE of the first ``i`` values in ``j`` intervals (empty ones allowed). Its
    leftmost optimal last cut is monotone in ``i`` (interval costs satisfy the quadrangle
    inequality), so each layer is one divide-and-conquer pass, vectorized over all nodes of a
    recursion level and all rows: ``O(n log n)`` interval costs per layer and row.
    """
    g, n = s.shape
    dev = s.device
    c = s - s.mean(dim=1, keepdim=True)  # centred: less cancellation in sum x^2 - S^2 / N
    z = torch.zeros(g, 1, dtype=_F64, device=dev)
    ps = torch.cat([z, c.cumsum(1)], 1).flatten()
    pq = torch.cat([z, (c * c).cumsum(1)], 1).flatten()
    width = n + 1
    if k > 1:
        native = _native_dp(ps.view(g, width), pq.view(g, width), k)
        if native is not None:
            return native
    big = torch.iinfo(torch.int64).max
    counts = torch.arange(width, dtype=_F64, device=dev)
    prev = (pq.view(g, width) - ps.view(g, width).square() / counts.clamp(min=1)).flatten()
    args = []
    for _ in range(1, k):
        cur = torch.empty(g * width, dtype=_F64, device=dev)
        arg = torch.empty(g * width, dtype=torch.int64, device=dev)
        row = torch.arange(g, device=dev)
        lo = torch.zeros(g, dtype=torch.int64, device=dev)
        hi = torch.full((g,), n, dtype=torch.int64, device=dev)
        olo, ohi = lo.clone(), hi.clone()
        while row.numel():
            nodes = row.numel()
            mid = (lo + hi) // 2
            lens = torch.minimum(mid, ohi) - olo + 1
            node = torch.repeat_interleave(torch.arange(nodes, device=dev), lens)
            start = lens.cumsum(0) - lens
            m = olo[node] + (torch.arange(node.numel(), device=dev) - start[node])
            base = (row * width)[node]
            i = base + mid[node]
            m_at = base + m
            sm = ps[i] - ps[m_at]
            val = prev[m_at] + (pq[i] - pq[m_at]) - sm * sm / (i - m_at).to(_F64).clamp(min=1)
            best = torch.full((nodes,), math.inf, dtype=_F64, device=dev).scatter_reduce(0, node, val, "amin")
            at = torch.where(val == best[node], m, big)
            pick = torch.full((nodes,), big, dtype=torch.int64, device=dev).scatter_reduce(0, node, at, "amin")
            flat = row * width + mid
            cur[flat] = best
            arg[flat] = pick
            left, right = lo < mid, mid < hi
            row = torch.cat([row[left], row[right]])
            lo, hi = torch.cat([lo[left], (mid + 1)[right]]), torch.cat([(mid - 1)[left], hi[right]])
            olo, ohi = torch.cat([olo[left], pick[right]]), torch.cat([pick[left], ohi[right]])
        prev = cur
        args.append(arg.view(g, width))
    return torch.cat(_backtrack(args, torch.full((g, 1), n, dtype=torch.int64, device=dev)), 1)


def _native_dp(ps: torch.Tensor, pq: torch.Tensor, k: int) -> torch.Tensor | None:
    """The compiled layers' cuts for prefix sums ``(G, n + 1)``, or None (kernels not built or turned off)."""
    if ps.device.type != "cpu":
        return None
    from ... import kernels  # optional compiled ops (they depend on torch alone)

    return kernels.kmeans_dp(ps, pq, k)
