"""Exact, deterministic 1-D k-means: the optimal partition of each row into ``k`` intervals.

In one dimension every k-means cluster is an interval of the sorted values, so the problem is to
choose ``k - 1`` cut positions. The cost of a partition is ``sum x^2 - sum_C S_C^2 / N_C`` (``N_C``,
``S_C``: count and sum of cluster ``C``), so prefix counts and sums are all a cut needs. The
result is the global optimum (not a Lloyd fixed point), found by pruning with lower bounds:

* Lower bound. Lay candidate cut positions out; consecutive positions form *items*. Any
  partition whose cut ``j`` lies inside item ``a_j`` costs at least: every cluster's *core* (its
  values strictly between two cut items) plus, for the item values the cluster takes, the cost
  of pulling the core's mean to the item's value hull. This bound is concave in how each item
  splits, so its minimum puts every item wholly on one side: a chain DP over (item, side) states
  evaluates it for all items at once. Items whose bound exceeds the best known partition (the
  exact chain DP over the same positions) cannot hold an optimal cut and are dropped.
* Sorted rows (float64, short rows, per-channel batches): the positions are those between
  distinct sorted values. Regions that may hold each cut start as the whole row and shrink by
  pruning passes over 16 equal items until they are small; all positions in them are then
  searched. Rows proceed independently, so a hard row never pads the others' work.
* Binned rows (float32/16 rows of ``n >= 2**15``; no sort): the bin of a value is a right shift
  of its order-preserving integer key (a few integer ops, no lookups): magnitudes within 2^9 of
  the largest one get bins of ``2^s`` keys (equal slices of their binade, ~2^13 bins in all),
  smaller ones one bin per binade. Every bin holds one sign and one binade, so its float64 sum
  is exact in any order: the result depends neither on the order of the values nor on the
  thread count. Bin edges are candidate cuts. The best partition over 129 quantile positions
  and a pruning pass over 32 quantile items bound each cut's region; the best partition over
  the bin edges within two quantile steps of it picks the bins around which a few bins are
  read from the data ("made fine": their distinct values become positions; one pass over the
  bin indices, range tests only); coordinate ascent (each cut to its best position with the
  others fixed, repeated until nothing moves) gives the incumbent; a layout with one item per
  value next to each cut and geometrically growing items further out certifies it, refining
  (and reading more bins) only where items survive.

* Compiled search: when the optional CPU kernels are built (:mod:`optimum_splitquant.kernels`),
  binned rows with ``2 <= k <= 4`` are searched by ``kernels/kmeans_cpu.cpp`` (same bins, same
  bound, plain loops). Prefix sums at positions inside read bins are ``sum of the bins before +
  exact sum of the bin's values before`` in both searches, so they return the same bits.

* Many clusters (``k >= 10``, or ``k >= 6`` on binned-length rows shorter than ``2**18``): the
  pruning search grows fast with ``k``, so the rows are sorted and solved by the classic dynamic
  programme with divide and conquer (the optimal last cut is monotone), ``O(k n log n)``.

``values`` of shape ``(G, n)`` gives ``G`` independent clusterings (``G = 1`` for a whole tensor,
``G = rows`` for per-output-channel clustering); a row gets bit-identical results alone or in a
batch, on any thread count. Ties in the optimum go to the first partition in position order.

Convention: a value ``v`` belongs to cluster ``j`` when ``b[j - 1] < v <= b[j]`` for the sorted
boundaries ``b`` (midpoints between consecutive centres), i.e. ``j = searchsorted(b, v, left)``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

__all__ = ["KMeans1D", "assign_clusters", "kmeans_1d"]

_MAX_ITER = 300
_F64 = torch.float64
_NEG = float("-inf")
_BINNED_MIN_N = 1 << 15  # float32/16 rows at least this long are binned instead of sorted
_LOG2_BINS = 13  # about 2^13 bins per row over the magnitudes within 2^9 of the largest one
_READ_BINS = 3  # bins read on each side of the best bin edges before the exact search
_START_ITEMS = 32  # quantile items of the first, global pruning pass
_ZOOM_ITEMS = 16  # items per region in each later pruning pass of sorted rows
_EXHAUSTIVE = 32  # regions at most this wide are searched position by position
_DENSE = 32  # single-value items on each side of an incumbent cut in the certificate layout
_GROWTH = 1.2  # then items grow by this factor with their distance from the cut
_TOL = 1e-11  # relative slack of the pruning test (rounding), times an upper bound of sum x^2
_NORM_CHUNK = 4096
_COMPARE_MAX = 7  # assign_clusters: at most this many boundaries are compared one by one, more are searched
# Many clusters: the pruning search grows fast with k, the divide-and-conquer DP does not.
_DC_MIN_K = 10
_DC_MIN_K_MID_ROWS = 6  # ... and from k = 6 on binned-length rows shorter than:
_DC_MAX_N_MID_K = 1 << 18
_NATIVE_MAX_K = 4  # the compiled binned search (kernels/kmeans_cpu.cpp) takes 2 <= k <= this


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


def kmeans_1d(values: torch.Tensor, k: int, max_iter: int = _MAX_ITER) -> KMeans1D:
    """Optimal k-means of each row of ``values`` (``(G, n)`` or ``(n,)``) into ``k`` intervals.

    ``max_iter`` bounds the final consistency pass (centre midpoints must reproduce the optimal
    partition; it only iterates when rounding makes a value sit exactly on a midpoint).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    x = values.detach()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"kmeans_1d expects a 1-D or 2-D tensor, got shape {tuple(values.shape)}")
    if x.is_complex() or not x.is_floating_point():
        x = x.to(_F64)
    rows, n = x.shape
    if n == 0:
        raise ValueError("kmeans_1d needs at least one value per row")
    lo, hi = torch.aminmax(x)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ValueError("kmeans_1d got NaN or infinite values")
    with torch.inference_mode():  # lower per-op overhead; the results are cloned out below
        binned = x.dtype in (torch.float32, torch.float16, torch.bfloat16) and n >= _BINNED_MIN_N
        if k >= _DC_MIN_K or (binned and k >= _DC_MIN_K_MID_ROWS and n < _DC_MAX_N_MID_K):
            centers, counts, inertia = _cluster_dc(x.to(_F64), k, max_iter)
        elif binned:
            parts = [_cluster_binned(x[g].to(torch.float32).contiguous(), k, max_iter) for g in range(rows)]
            centers, counts, inertia = (torch.cat(t) for t in zip(*parts, strict=True))
        else:
            centers, counts, inertia = _cluster_sorted(x.to(_F64), k, max_iter)
        bounds = _midpoints(centers)
    return KMeans1D(centers=centers.clone(), boundaries=bounds.clone(), counts=counts.clone(), inertia=inertia.clone())


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
    return (centers[:, :-1] + centers[:, 1:]) * 0.5


# ================================================================================= search engine


def _val(dn: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """S^2 / N of a range (0 when empty: then S is exactly 0 too): its sum of squares minus this is its SSE."""
    return (ds * ds / dn).nan_to_num_(0.0)


def _pull(n_core: torch.Tensor, n_item: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Least SSE increase when ``n_item`` values at least ``dist`` from a core's mean join it."""
    return n_core * n_item / (n_core + n_item).clamp(min=1.0) * dist.clamp(min=0.0).square()


@dataclass
class _Layout:
    """Candidate cut positions of each row, ascending, as prefix statistics (float64 ``(G, P)``).

    n, s: count and sum of the values before the position; q: an upper bound of their sum of
    squares; lo: a lower bound of the first value after it; hi: an upper bound of the last value
    before it; ok: the position exists (rows are padded).
    """

    n: torch.Tensor
    s: torch.Tensor
    q: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    ok: torch.Tensor


def _best_cuts(lays, okcut, nt, st):
    """Exact best partition with cut j at a position of lays[j] allowed by okcut[j] (chain DP).

    Returns (value (G,), index (G, k - 1) into each cut's layout); value = sum of S^2/N."""
    v = torch.where(okcut[0], _val(lays[0].n, lays[0].s), _NEG)
    backs = []
    for j in range(1, len(lays)):
        a, b = lays[j - 1], lays[j]
        dn = b.n.unsqueeze(1) - a.n.unsqueeze(2)
        cand = v.unsqueeze(2) + _val(dn, b.s.unsqueeze(1) - a.s.unsqueeze(2))
        v, arg = torch.max(cand.masked_fill((dn < 0) | ~okcut[j].unsqueeze(1), _NEG), 1)
        backs.append(arg)
    last = lays[-1]
    best, idx = torch.max(torch.where(okcut[-1], v + _val(nt - last.n, st - last.s), _NEG), 1)
    idx = idx.unsqueeze(1)
    picks = [idx]
    for arg in reversed(backs):
        idx = arg.gather(1, idx)
        picks.append(idx)
    picks.reverse()
    return best, torch.cat(picks, 1)


def _prune_pass(lays, lo, hi, cuts, best, nt, st, tol):
    """One pruning pass over layouts whose cut ``j`` must lie in ``[lo[:, j], hi[:, j]]``.

    The best partition over the layouts' positions improves the incumbent (``cuts``, score
    ``best``); returns it with, per cut, the items that may still hold an optimal cut.
    """
    k1 = len(lays)
    rl = [lo[:, j : j + 1] for j in range(k1)]
    rh = [hi[:, j : j + 1] for j in range(k1)]
    okcut = [lay.ok & (lay.n >= a) & (lay.n <= b) for lay, a, b in zip(lays, rl, rh, strict=True)]
    val, idx = _best_cuts(lays, okcut, nt, st)
    better = val > best
    best = torch.where(better, val, best)
    found = torch.cat([lay.n.gather(1, idx[:, j : j + 1]) for j, lay in enumerate(lays)], 1)
    cuts = torch.where(better.unsqueeze(1), found, cuts)
    okitem = []
    for lay, a, b in zip(lays, rl, rh, strict=True):
        nu, nv = lay.n[:, :-1], lay.n[:, 1:]
        okitem.append(lay.ok[:, :-1] & lay.ok[:, 1:] & (nv > nu) & (nu >= a) & (nv <= b))
    return cuts, best, _keep_items(lays, okitem, nt, st, best - tol)


def _keep_items(lays, okitem, nt, st, thresh):
    """Items (consecutive positions of lays[j]) that may hold cut j of a partition whose score
    (sum of S^2/N) reaches ``thresh``; see the module docstring for the bound."""
    g = lays[0].n.shape[0]
    items = []
    for lay in lays:
        items.append(
            (lay.n[:, :-1], lay.s[:, :-1], lay.n[:, 1:], lay.s[:, 1:], lay.q.diff(dim=1), lay.lo[:, :-1], lay.hi[:, 1:])
        )
    # first core [0, u) takes the item on side "left"; the last core [v, end) on side "right"
    nu, su, nv, _, qi, lo, _ = items[0]
    head = _val(nu, su) + qi
    head = torch.stack([head - _pull(nu, nv - nu, lo - su / nu.clamp(min=1.0)), head], 2).reshape(g, -1)
    nu, _, nv, sv, _, _, hi = items[-1]
    nz, sz = nt - nv, st - sv
    tail = _val(nz, sz)
    tail = torch.stack([tail, tail - _pull(nz, nv - nu, sz / nz.clamp(min=1.0) - hi)], 2).reshape(g, -1)
    if len(lays) == 2:  # k = 3: the four corners of each (item a, item b) pair directly
        au, _, av, asv, _, _, ahi = items[0]
        bu, bsu, bv, _, bq, blo, _ = items[1]
        ny = (bu.unsqueeze(1) - av.unsqueeze(2)).clamp(min=0.0)
        sy = torch.where(ny > 0, bsu.unsqueeze(1) - asv.unsqueeze(2), 0.0)
        mu = sy / ny.clamp(min=1.0)
        na, nb = (av - au).unsqueeze(2), (bv - bu).unsqueeze(1)
        dl = (mu - ahi.unsqueeze(2)).clamp(min=0.0).square()
        dr = (blo.unsqueeze(1) - mu).clamp(min=0.0).square()
        dd = (blo.unsqueeze(1) - ahi.unsqueeze(2)).clamp(min=0.0).square()
        w_rr = ny * na * dl / (ny + na).clamp(min=1.0)
        w_ll = ny * nb * dr / (ny + nb).clamp(min=1.0)
        w_rl = (ny * (na * dl + nb * dr) + na * nb * dd) / (ny + na + nb).clamp(min=1.0)
        hd = head.view(g, -1, 2)
        tl = tail.view(g, -1, 2)
        hl, hr = hd[..., 0].unsqueeze(2), hd[..., 1].unsqueeze(2)
        tl_, tr = tl[..., 0].unsqueeze(1), tl[..., 1].unsqueeze(1)
        base = _val(ny, sy) + bq.unsqueeze(1)
        score = (
            torch.maximum(torch.maximum(hl - w_ll + tl_, hl + tr), torch.maximum(hr - w_rl + tl_, hr - w_rr + tr))
            + base
        )
        if lays[0] is lays[1]:  # shared layout: both cuts in one item
            i = torch.arange(au.shape[1], device=au.device)
            same = (i.unsqueeze(1) == i.unsqueeze(0)).unsqueeze(0)
            score = torch.where(same, hr + tl_, score)  # the item counted once, no pulls
        allowed = (au.unsqueeze(2) < bv.unsqueeze(1)) & okitem[0].unsqueeze(2) & okitem[1].unsqueeze(1)
        score = score.masked_fill(~allowed, _NEG)
        th = thresh.view(-1, 1)
        return [okitem[0] & (score.amax(2) >= th), okitem[1] & (score.amax(1) >= th)]
    gains = []
    for j in range(len(lays) - 1):
        au, _, av, asv, _, _, ahi = items[j]
        bu, bsu, bv, _, bq, blo, _ = items[j + 1]
        ny = (bu.unsqueeze(1) - av.unsqueeze(2)).clamp(min=0.0)  # core between item a and item b
        sy = torch.where(ny > 0, bsu.unsqueeze(1) - asv.unsqueeze(2), 0.0)
        mu = sy / ny.clamp(min=1.0)
        na, nb = (av - au).unsqueeze(2), (bv - bu).unsqueeze(1)
        dl = (mu - ahi.unsqueeze(2)).clamp(min=0.0).square()
        dr = (blo.unsqueeze(1) - mu).clamp(min=0.0).square()
        dd = (blo.unsqueeze(1) - ahi.unsqueeze(2)).clamp(min=0.0).square()
        base = _val(ny, sy) + bq.unsqueeze(1)
        w_rr = ny * na * dl / (ny + na).clamp(min=1.0)
        w_ll = ny * nb * dr / (ny + nb).clamp(min=1.0)
        w_rl = (ny * (na * dl + nb * dr) + na * nb * dd) / (ny + na + nb).clamp(min=1.0)
        gain = torch.stack([base - w_ll, base, base - w_rl, base - w_rr], -1)  # sides of (a, b): LL LR RL RR
        if lays[j] is lays[j + 1]:  # shared layout: both cuts in one item cost nothing extra
            i = torch.arange(au.shape[1], device=au.device)
            gain = torch.where((i.unsqueeze(1) == i.unsqueeze(0)).view(1, len(i), len(i), 1), 0.0, gain)
        gain = gain.masked_fill(~(au.unsqueeze(2) < bv.unsqueeze(1)).unsqueeze(-1), _NEG)
        ia, ib = au.shape[1], bu.shape[1]
        gains.append(gain.view(g, ia, ib, 2, 2).transpose(2, 3).reshape(g, 2 * ia, 2 * ib))
    ok2 = [o.repeat_interleave(2, dim=1) for o in okitem]
    f = [torch.where(ok2[0], head, _NEG)]
    for j, gain in enumerate(gains):
        f.append((f[-1].unsqueeze(2) + gain).masked_fill(~ok2[j + 1].unsqueeze(1), _NEG).amax(1))
    h = [torch.where(ok2[-1], tail, _NEG)]
    for j in range(len(gains) - 1, -1, -1):
        h.append((gains[j] + h[-1].unsqueeze(1)).masked_fill(~ok2[j].unsqueeze(2), _NEG).amax(2))
    h.reverse()
    th = thresh.unsqueeze(1)
    return [okitem[j] & ((f[j] + h[j]).view(g, -1, 2).amax(2) >= th) for j in range(len(lays))]


def _layouts(src, targets, overlap):
    """One layout per cut; one shared by all cuts when their regions overlap (so that items of
    different cuts are either equal or disjoint, which keeps the bound tight)."""
    if overlap:
        return [src.layout(torch.cat(targets, 1))] * len(targets)
    return [src.layout(t) for t in targets]


def _grown_steps(start: int, limit: float) -> list[int]:
    steps, d = [], start
    while d <= limit:
        d = max(d + 1, math.ceil(d * _GROWTH))
        steps.append(d)
    return steps


_FAR_STEPS = _grown_steps(_DENSE, 2.0**62)  # the steps after the dense ones (a constant table)


def _offsets(span: int) -> list[int]:
    """0, +-1, ..., +-_DENSE, then steps growing by _GROWTH, until past ``span``."""
    if span < _DENSE:
        steps = list(range(1, max(span, 1) + 1))
        steps += _grown_steps(steps[-1], span)
    else:
        steps = [*range(1, _DENSE + 1), *_FAR_STEPS[: bisect.bisect_right(_FAR_STEPS, span) + 1]]
    return [*(-s for s in reversed(steps)), 0, *steps]


_ALL_STEPS = len(_offsets(int(2.0**61))) // 2
_ALL_OFFSETS = torch.tensor(_offsets(int(2.0**61)), dtype=_F64)  # a constant table


def _around(cut, lo, hi):
    """Target counts around one incumbent cut (G,) within [lo, hi] (G,), see _offsets."""
    span = int((hi - lo).max())
    if span < _DENSE:
        off = torch.tensor(_offsets(span), dtype=_F64, device=cut.device)
    else:
        m = _DENSE + bisect.bisect_right(_FAR_STEPS, span) + 1
        off = _ALL_OFFSETS[_ALL_STEPS - m : _ALL_STEPS + m + 1].to(cut.device)
    t = torch.minimum(torch.maximum(cut.unsqueeze(1) + off, lo.unsqueeze(1)), hi.unsqueeze(1))
    return torch.cat([lo.unsqueeze(1), t, hi.unsqueeze(1)], 1)


def _coordinate_ascent(src, cuts, lo, hi, rounds=16):
    """Each cut (a count) moved to its best position within [lo, hi] with the others fixed,
    cycling until nothing moves (an exact local optimum)."""
    k1 = cuts.shape[1]
    lays = [src.range_layout(lo[:, j], hi[:, j]) for j in range(k1)]
    ordered = bool((hi[:, :-1] <= lo[:, 1:]).all())  # disjoint regions: no order constraints
    cur_n = [cuts[:, j : j + 1] for j in range(k1)]
    cur_s = [src.sum_at(c) for c in cur_n]
    zero = torch.zeros_like(src.nt)
    for _ in range(rounds):
        moved = False
        for j, lay in enumerate(lays):
            nl, sl = (cur_n[j - 1], cur_s[j - 1]) if j > 0 else (zero, zero)
            nr, sr = (cur_n[j + 1], cur_s[j + 1]) if j < k1 - 1 else (src.nt, src.st)
            f = _val(lay.n - nl, lay.s - sl) + _val(nr - lay.n, sr - lay.s)
            if not ordered:
                f = f.masked_fill(~lay.ok | (lay.n < nl) | (lay.n > nr), _NEG)
            best, arg = torch.max(f, 1, keepdim=True)  # the first best position
            new_n = lay.n.gather(1, arg)
            if not ordered:
                new_n = torch.where(best > _NEG, new_n, cur_n[j])
            if not torch.equal(new_n, cur_n[j]):
                moved = True
                cur_n[j], cur_s[j] = new_n, src.sum_at(new_n) if not ordered else lay.s.gather(1, arg)
        if not moved:
            break
    return torch.cat(cur_n, 1)


def _start(src, k):
    """Incumbent cuts and regions holding the optimal cuts (all counts): the best partition over
    4 * _START_ITEMS + 1 quantile positions, then lower bounds on _START_ITEMS quantile items."""
    q = torch.linspace(0, 1, 4 * _START_ITEMS + 1, dtype=_F64, device=src.nt.device).unsqueeze(0) * src.nt
    fine = src.layout(q)
    best, idx = _best_cuts([fine] * (k - 1), [fine.ok] * (k - 1), src.nt, src.st)
    cuts = fine.n.gather(1, idx)
    lay = src.layout(q[:, ::4])
    lays = [lay] * (k - 1)
    nu, nv = lay.n[:, :-1], lay.n[:, 1:]
    itm = lay.ok[:, :-1] & lay.ok[:, 1:] & (nv > nu)
    keeps = _keep_items(lays, [itm] * (k - 1), src.nt, src.st, best - _TOL * src.q_bound)
    lo = torch.minimum(torch.stack([torch.where(kp, nu, math.inf).amin(1) for kp in keeps], 1), cuts)
    hi = torch.maximum(torch.stack([torch.where(kp, nv, -1.0).amax(1) for kp in keeps], 1), cuts)
    return cuts, lo, hi


def _certify(src, cuts, lo, hi, max_levels=64):
    """Exact best cuts (counts), given an incumbent and regions known to hold the optimal cuts."""
    g, k1 = cuts.shape
    nt, st = src.nt, src.st
    tol = _TOL * src.q_bound
    lo, hi = lo.clone(), hi.clone()
    best = torch.full((g,), _NEG, dtype=_F64, device=cuts.device)
    targets = [_around(cuts[:, j], lo[:, j], hi[:, j]) for j in range(k1)]
    for _ in range(max_levels):
        lays = _layouts(src, targets, bool((hi[:, :-1] > lo[:, 1:]).any()))
        cuts, best, keeps = _prune_pass(lays, lo, hi, cuts, best, nt, st, tol)
        for lay, kp in zip(lays, keeps, strict=True):
            src.expand(lay, kp)  # kept single coarse bins: read their values
        splits = [src.split_points(lay) for lay in lays]
        opened = [kp & (sp < lay.n[:, 1:]) for lay, kp, sp in zip(lays, keeps, splits, strict=True)]
        if not any(bool(o.any()) for o in opened):
            return best, cuts
        targets = []
        for j, (lay, kp, op, sp) in enumerate(zip(lays, keeps, opened, splits, strict=True)):
            nu, nv = lay.n[:, :-1], lay.n[:, 1:]
            lo[:, j] = torch.minimum(torch.where(kp, nu, math.inf).amin(1), cuts[:, j])
            hi[:, j] = torch.maximum(torch.where(kp, nv, -1.0).amax(1), cuts[:, j])
            fill = lo[:, j : j + 1]
            inside = lay.ok & (lay.n >= fill) & (lay.n <= hi[:, j : j + 1])
            keep_pos = torch.where(inside, lay.n, fill)
            targets.append(torch.cat([keep_pos, torch.where(op, sp, fill), _around(cuts[:, j], lo[:, j], hi[:, j])], 1))
    raise RuntimeError("kmeans_1d: the exact search did not converge")


def _closest_inside(u, v, mid, down, up):
    """Of the candidate splits (largest valid <= mid, smallest valid > mid) the one nearest to mid
    strictly inside (u, v); v when the item has no valid position inside."""
    down_ok = down > u
    up_ok = up < v
    pick_down = down_ok & (~up_ok | (mid - down <= up - mid))
    return torch.where(pick_down, down, torch.where(up_ok, up, v))


def _row_unique(t):
    """Sorted distinct values of each row, padded at the end by repeating the row's last value."""
    if t.shape[0] == 1:
        return torch.unique(t).unsqueeze(0)
    s = torch.sort(t, 1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    cnt = int((~dup).sum(1).max())
    big = torch.iinfo(s.dtype).max if not s.is_floating_point() else math.inf
    s = torch.sort(s.masked_fill(dup, big), 1).values[:, :cnt]
    pad = s == big
    return torch.where(pad, s.masked_fill(pad, s.min() - 1).cummax(1).values, s)


# ================================================================================= sorted rows


class _SortedSource:
    """Cut positions between the sorted values of each row (never between two equal values)."""

    def __init__(self, s, sc, qc, parent=None, rows=None):
        g, n = s.shape
        self.s, self.sc, self.qc, self.size = s, sc, qc, n
        self.nt = torch.full((g, 1), float(n), dtype=_F64, device=s.device)
        self.st = sc[:, -1:]
        self.q_bound = qc[:, -1].abs()
        if parent is not None:
            self.valid, self.next_ok = parent.valid[rows], parent.next_ok[rows]
            return
        ok = torch.ones(g, n + 1, dtype=torch.bool, device=s.device)
        ok[:, 1:n] = s[:, 1:] > s[:, :-1]
        self.valid = ok
        ar = torch.arange(n + 1, device=s.device).expand(g, -1)
        self.next_ok = torch.where(ok, ar, n).flip(1).cummin(1).values.flip(1)

    def subset(self, rows):
        return _SortedSource(self.s[rows], self.sc[rows], self.qc[rows], self, rows)

    def _records(self, idx, ok):
        n = self.size
        return _Layout(
            idx.to(_F64),
            self.sc.gather(1, idx),
            self.qc.gather(1, idx),
            self.s.gather(1, idx.clamp(max=n - 1)),
            self.s.gather(1, (idx - 1).clamp(min=0)),
            ok,
        )

    def layout(self, targets):
        idx = self.next_ok.gather(1, targets.ceil().to(torch.int64).clamp(0, self.size))
        idx = _row_unique(idx)
        return self._records(idx, torch.ones_like(idx, dtype=torch.bool))

    def range_layout(self, lo, hi):
        a, b = lo.to(torch.int64), hi.to(torch.int64)
        idx = a.unsqueeze(1) + torch.arange(int((b - a).max()) + 1, device=a.device)
        ok = idx <= b.unsqueeze(1)
        idx = idx.clamp(max=self.size)
        return self._records(idx, ok & self.valid.gather(1, idx))


def _zoom_level(src, cuts, lo, hi, best, items):
    """One pruning pass on ``items`` equal items per region; returns the shrunk regions."""
    k1 = cuts.shape[1]
    overlap = (hi[:, :-1] > lo[:, 1:]).any(1)
    if bool(overlap.any()) and not bool(overlap.all()):  # rows with overlapping regions go apart
        out = [cuts.clone(), lo.clone(), hi.clone(), best.clone()]
        for rows in (overlap.nonzero().flatten(), (~overlap).nonzero().flatten()):
            part = _zoom_level(src.subset(rows), cuts[rows], lo[rows], hi[rows], best[rows], items)
            for o, p in zip(out, part, strict=True):
                o[rows] = p
        return tuple(out)
    frac = torch.linspace(0, 1, items + 1, dtype=_F64, device=cuts.device)
    targets = [lo[:, j : j + 1] + (hi - lo)[:, j : j + 1] * frac for j in range(k1)]
    lays = _layouts(src, targets, bool(overlap.any()))
    cuts, best, keeps = _prune_pass(lays, lo, hi, cuts, best, src.nt, src.st, _TOL * src.q_bound)
    lo, hi = lo.clone(), hi.clone()
    for j, (lay, kp) in enumerate(zip(lays, keeps, strict=True)):
        lo[:, j] = torch.minimum(torch.where(kp, lay.n[:, :-1], math.inf).amin(1), cuts[:, j])
        hi[:, j] = torch.maximum(torch.where(kp, lay.n[:, 1:], -1.0).amax(1), cuts[:, j])
    return cuts, lo, hi, best


def _solve_rows(src, cuts, lo, hi, items=_ZOOM_ITEMS, max_levels=64):
    """Exact best cuts (counts) of every row of a sorted source, given regions holding them:
    regions shrink by pruning passes until they are small, then all position pairs are searched.
    Rows move on independently (a row whose regions stop shrinking continues alone with finer
    items), so one hard row does not pad the work of the others."""
    g, k1 = cuts.shape
    out = cuts.clone()
    todo = torch.arange(g, device=cuts.device)
    best = torch.full((g,), _NEG, dtype=_F64, device=cuts.device)
    last = torch.full((g,), math.inf, dtype=_F64, device=cuts.device)
    for _ in range(max_levels):
        width = (hi - lo).amax(1)
        done = width <= max(_EXHAUSTIVE, items)
        stuck = ~done & (width >= last)
        if bool(done.any()):
            rows = done.nonzero().flatten()
            sub = src if bool(done.all()) else src.subset(rows)
            lays = [sub.range_layout(lo[rows, j], hi[rows, j]) for j in range(k1)]
            _, idx = _best_cuts(lays, [lay.ok for lay in lays], sub.nt, sub.st)
            out[todo[rows]] = torch.cat([lay.n.gather(1, idx[:, j : j + 1]) for j, lay in enumerate(lays)], 1)
        if bool(stuck.any()):
            rows = stuck.nonzero().flatten()
            out[todo[rows]] = _solve_rows(src.subset(rows), cuts[rows], lo[rows], hi[rows], items * 4)
        go = ~(done | stuck)
        if not bool(go.any()):
            return out
        if not bool(go.all()):
            rows = go.nonzero().flatten()
            src, todo = src.subset(rows), todo[rows]
            cuts, lo, hi, best, width = cuts[rows], lo[rows], hi[rows], best[rows], width[rows]
        last = width
        cuts, lo, hi, best = _zoom_level(src, cuts, lo, hi, best, items)
    raise RuntimeError("kmeans_1d: the exact search did not converge")


def _cluster_sorted(x, k, max_iter):
    g, n = x.shape
    s = torch.sort(x, dim=1).values.contiguous()
    z = torch.zeros(g, 1, dtype=_F64, device=x.device)
    sc = torch.cat([z, s.cumsum(1)], 1)
    qc = torch.cat([z, (s * s).cumsum(1)], 1)
    if k == 1:
        cuts = torch.zeros(g, 0, dtype=torch.int64, device=x.device)
    else:
        src = _SortedSource(s, sc, qc)
        lo = torch.zeros(g, k - 1, dtype=_F64, device=x.device)
        hi = torch.full_like(lo, float(n))
        cuts = _solve_rows(src, lo.clone(), lo, hi).to(torch.int64)
    return _finish_sorted(s, sc, qc, cuts, max_iter)


def _cluster_dc(x, k, max_iter):
    s = torch.sort(x, dim=1).values.contiguous()
    z = torch.zeros(s.shape[0], 1, dtype=_F64, device=x.device)
    sc = torch.cat([z, s.cumsum(1)], 1)
    qc = torch.cat([z, (s * s).cumsum(1)], 1)
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
    cut = torch.full((g, 1), n, dtype=torch.int64, device=dev)
    cuts = []
    for arg in reversed(args):
        cut = arg.gather(1, cut)
        cuts.append(cut)
    cuts.reverse()
    return torch.cat(cuts, 1)


def _canonical(counts, sums):
    """Empty clusters move to the end and repeat the last centre; the others' centres are means."""
    order = torch.sort((counts == 0).to(torch.int8), dim=1, stable=True).indices
    counts = counts.gather(1, order)
    sums = sums.gather(1, order)
    ne = counts > 0
    means = sums / counts.clamp(min=1)
    return counts, sums, torch.where(ne, means, torch.where(ne, means, _NEG).cummax(1).values)


def _finish_sorted(s, sc, qc, cuts, max_iter):
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


# ================================================================================= binned rows


def _float_keys(x):
    """Order-preserving int32 keys of float32 values (the map is its own inverse; -0.0 < +0.0)."""
    b = x.view(torch.int32)
    return (b >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(b)


def _keys_to_values(keys):
    k = keys.to(torch.int32)
    return (((k >> 31) & 0x7FFFFFFF) ^ k).view(torch.float32).to(_F64)


def _sum_of_squares(x):
    """Sum of squares of a float32 row in float64, with a fixed reduction order (independent of the
    thread count)."""
    n = x.numel()
    main = n - n % _NORM_CHUNK
    total = 0.0
    if main:
        total += float(torch.linalg.vector_norm(x[:main].view(-1, _NORM_CHUNK), dim=1, dtype=_F64).square().sum())
    if n - main:
        total += float(x[main:].to(_F64).square().sum())
    return total


def _sums_before(uv, ucnt, start):
    """Exact sum of the values (``ucnt`` copies of each sorted distinct float32 ``uv``) of the same
    bin before each one (``start``: index of the bin's first distinct value). A bin is one sign and
    one binade, so these are whole multiples of its ulp: summed as int64 multiples, they are exact,
    the same number the compiled search computes."""
    e = (uv.view(torch.int32) >> 23).bitwise_and_(0xFF).clamp_(min=1) - 150  # ulp exponent of the binade
    units = (torch.ldexp(uv.to(_F64), -e.to(_F64)) * ucnt.to(_F64)).to(torch.int64)
    before = torch.cat([units.new_zeros(1), units.cumsum(0)])[:-1]
    return torch.ldexp((before - before[start]).to(_F64), e.to(_F64))


def _select(x, mask):
    """``x[mask]`` for a sparse ``mask``: the mask is scanned 8 bytes at a time."""
    n = mask.numel()
    head = n - n % 8
    words = mask[:head].view(torch.int64)
    pos = ((words != 0).nonzero() * 8 + torch.arange(8, device=x.device)).flatten()
    if head < n:
        pos = torch.cat([pos, torch.arange(head, n, device=x.device)])
    return x[pos[mask[pos]]]


class _BinnedSource:
    """Cut positions of one float32 row: edges of log-spaced bins, and inside "fine" bins the
    boundaries between their distinct values (read from the data when a bin is made fine)."""

    def __init__(self, x):
        self.x = x
        dev = x.device
        keys = _float_keys(x)
        kmin, kmax = (int(t) for t in torch.aminmax(keys))
        # magnitudes below 2^-9 of the largest one ("centre") get one bin per binade; the others
        # (nearly all values) get bins of 2^s keys, s such that they make about 2^_LOG2_BINS bins
        e_top = max(kmax, -1 - kmin) >> 23
        self.ct = max(e_top - 9, 0)  # centre: biased exponent below this
        kt = self.ct << 23
        span = max(0, kmax - max(kmin, kt) + 1) + max(0, min(kmax, -kt - 1) - kmin + 1)
        self.s = min(23, max(0, math.ceil(math.log2(max(span, 1) / 2.0**_LOG2_BINS))))
        self.base = 0
        self.base = self._bin_of(torch.tensor([kmin], dtype=torch.int64))[0].item()
        nb = self._bin_of(torch.tensor([kmax], dtype=torch.int64))[0].item() + 1
        self.nb = nb
        self.idx = self._bin_of(keys)
        counts = torch.bincount(self.idx, minlength=nb)
        x64 = x.to(_F64)
        sums = torch.bincount(self.idx, weights=x64, minlength=nb)
        low_keys = self._low_key(torch.arange(nb + 1, dtype=torch.int64, device=dev))
        hull = torch.stack([low_keys[:-1], low_keys[1:] - 1]).clamp_(min=kmin, max=kmax)
        elo, ehi = _keys_to_values(hull).unbind()  # value hull of each bin
        cnt = counts.to(_F64)
        # sum of squares of a bin <= (lo + hi) S - N lo hi, as (x - lo)(x - hi) <= 0 inside its hull
        self.qb = ((elo + ehi) * sums - cnt * elo * ehi).clamp_(min=0)
        self.counts = counts
        prefix = torch.stack([cnt, sums, self.qb]).cumsum(1)
        self.nc, self.sc, self.qc = torch.cat([prefix.new_zeros(3, 1), prefix], 1).unbind()
        # value hulls seen from each bin edge: next non-empty bin's low end, previous one's high end
        full = torch.cat([counts > 0, torch.ones(1, dtype=torch.bool, device=dev)])
        ar = torch.arange(nb + 1, device=dev)
        nxt = torch.where(full, ar, nb).flip(0).cummin(0).values.flip(0).clamp(max=nb - 1)
        prv = (torch.where(full.roll(1), ar, 0).cummax(0).values - 1).clamp(min=0)
        self.bin_lo, self.bin_hi, self.nxt, self.prv = elo, ehi, nxt, prv
        self.edge_lo = elo[nxt]
        self.edge_hi = ehi[prv]
        self.nt = self.nc[-1:].view(1, 1)
        self.st = self.sc[-1:].view(1, 1)
        self.q_bound = self.qc[-1:].abs()
        self.fine = torch.zeros(nb, dtype=torch.bool, device=dev)
        self.coarse = counts > 1  # bins that may hold several distinct values and are not fine
        self._raw_n = torch.zeros(0, dtype=_F64, device=dev)  # boundaries inside fine bins

    def _bin_of(self, keys):
        """Bin index of integer keys (overwritten): ``keys >> s``, the centre squeezed to one bin
        per binade."""
        u = keys.bitwise_right_shift_(self.s)
        if self.ct == 0:
            return u.sub_(self.base)
        ct = (self.ct << 23) >> self.s
        c = u.clamp(-ct, ct - 1)
        return u.sub_(c).add_(c.bitwise_right_shift_(23 - self.s)).sub_(self.base)

    def _low_key(self, b):
        """Smallest key of bins ``b`` (int64): the inverse of :meth:`_bin_of`."""
        v = b + self.base
        if self.ct == 0:
            return v << self.s
        ct, cc = (self.ct << 23) >> self.s, self.ct
        u = torch.where(v >= cc, v + (ct - cc), torch.where(v < -cc, v - (ct - cc), v << (23 - self.s)))
        return u << self.s

    def _read(self, table):
        """The values (in data order) of the bins marked in ``table``: runs of marked bins become
        range tests on the bin indices (int32 arithmetic; a gather when there are many runs)."""
        z = table.new_zeros(1, dtype=torch.int8)
        d = table.to(torch.int8).diff(prepend=z, append=z)
        runs = torch.stack([(d > 0).nonzero().flatten(), (d < 0).nonzero().flatten() - 1], 1).tolist()
        if not runs:
            return self.x[:0]
        if len(runs) > 4:
            return self.x[table[self.idx]]
        dist = None
        for a, b in runs:  # |2 idx - (a + b)| - (b - a) <= 0  <=>  a <= idx <= b
            t = self.idx.mul(2).sub_(a + b).abs_().sub_(b - a)
            dist = t if dist is None else dist.minimum(t)
        return _select(self.x, dist.le_(0).to(torch.bool))

    def make_fine(self, bins):
        """Read the distinct values of ``bins`` (bin indices) from the data; False if none is new."""
        new = torch.zeros_like(self.fine)
        new[bins] = True
        new &= ~self.fine
        if not bool(new.any()):
            return False
        self.fine |= new
        self.coarse &= ~self.fine
        vals = torch.sort(self._read(self.fine)).values
        uv, ucnt = torch.unique_consecutive(vals, return_counts=True)
        ubin = self._bin_of(_float_keys(uv.clone()).to(torch.int64))
        u64, c64 = uv.to(_F64), ucnt.to(_F64)
        # fine bins: exact sums of squares replace the bounds in the prefix
        self.qb = torch.where(self.fine, 0.0, self.qb).index_add(0, ubin, c64 * u64 * u64)
        self.qc = torch.cat([self.qc[:1], self.qb.cumsum(0)])
        first = torch.ones_like(ubin, dtype=torch.bool)
        first[1:] = ubin[1:] != ubin[:-1]
        last = torch.ones_like(first)
        last[:-1] = first[1:]
        start = torch.searchsorted(ubin, ubin)
        zero = torch.zeros(1, dtype=_F64, device=uv.device)
        cn, cq = (torch.cat([zero, t.cumsum(0)])[:-1] for t in (c64, c64 * u64 * u64))
        inner = ~first
        self._raw_n = (self.nc[ubin] + (cn - cn[start]))[inner]
        self._raw_s = (self.sc[ubin] + _sums_before(uv, ucnt, start))[inner]
        self._raw_q = (self.qc[ubin] + (cq - cq[start]))[inner]
        self._raw_lo = u64[inner]
        self._raw_hi = torch.cat([u64[:1], u64[:-1]])[inner]
        # fine bins: their smallest and largest values replace the hull, at every edge that sees them
        self.bin_lo = self.bin_lo.clone()
        self.bin_hi = self.bin_hi.clone()
        self.bin_lo[ubin[first]] = u64[first]
        self.bin_hi[ubin[last]] = u64[last]
        self.edge_lo = self.bin_lo[self.nxt]
        self.edge_hi = self.bin_hi[self.prv]
        return True

    def _records(self, t):
        """Layout fields at valid counts ``t`` (1-D)."""
        e = torch.searchsorted(self.nc, t).clamp(max=self.nb)
        if self._raw_n.numel() == 0:
            return _Layout(
                t,
                self.sc[e],
                self.qc[e],
                self.edge_lo[e.clamp(max=self.nb - 1)],
                self.edge_hi[e],
                torch.ones_like(t, dtype=torch.bool),
            )
        at_edge = self.nc[e] == t
        r = torch.searchsorted(self._raw_n, t).clamp(max=self._raw_n.numel() - 1)
        return _Layout(
            t,
            torch.where(at_edge, self.sc[e], self._raw_s[r]),
            torch.where(at_edge, self.qc[e], self._raw_q[r]),
            torch.where(at_edge, self.edge_lo[e.clamp(max=self.nb - 1)], self._raw_lo[r]),
            torch.where(at_edge, self.edge_hi[e], self._raw_hi[r]),
            torch.ones_like(t, dtype=torch.bool),
        )

    def _snap(self, t):
        """Smallest valid count >= t."""
        e = self.nc[torch.searchsorted(self.nc, t).clamp(max=self.nb)]
        if self._raw_n.numel():
            r = torch.searchsorted(self._raw_n, t)
            e = torch.minimum(e, torch.cat([self._raw_n, self.nc[-1:]])[r])
        return e

    def _snap_down(self, t):
        """Largest valid count <= t."""
        e = self.nc[(torch.searchsorted(self.nc, t, right=True) - 1).clamp(min=0)]
        if self._raw_n.numel():
            r = torch.searchsorted(self._raw_n, t, right=True)
            e = torch.maximum(e, torch.cat([self.nc[:1], self._raw_n])[r])
        return e

    def _lay(self, t):
        return _Layout(*(f.unsqueeze(0) for f in vars(self._records(t)).values()))

    def layout(self, targets):
        return self._lay(torch.unique(self._snap(targets[0].clamp(0, float(self.nc[-1])))))

    def range_layout(self, lo, hi):
        """Every valid position with count in [lo, hi] (bin edges, then fine-bin boundaries)."""
        a, b = torch.cat([lo, hi]).to(_F64).unbind()
        ea, eb = int(torch.searchsorted(self.nc, a)), int(torch.searchsorted(self.nc, b, right=True))
        fields = [f[ea:eb] for f in (self.nc, self.sc, self.qc, self.edge_lo, self.edge_hi)]
        if self._raw_n.numel():
            ra, rb = int(torch.searchsorted(self._raw_n, a)), int(torch.searchsorted(self._raw_n, b, right=True))
            raw = (self._raw_n, self._raw_s, self._raw_q, self._raw_lo, self._raw_hi)
            fields = [torch.cat([f, r[ra:rb]]) for f, r in zip(fields, raw, strict=True)]
        return _Layout(*(f.unsqueeze(0) for f in fields), torch.ones(1, fields[0].numel(), dtype=torch.bool))

    def sum_at(self, counts):
        return self._records(counts[0]).s.unsqueeze(0)

    def split_points(self, lay):
        u, v = lay.n[0, :-1], lay.n[0, 1:]
        mid = torch.floor((u + v) * 0.5)
        return _closest_inside(u, v, mid, self._snap_down(mid), self._snap(mid + 1)).unsqueeze(0)

    def expand(self, lay, kept):
        """Make fine the coarse bins that a kept item consists of."""
        u, v = lay.n[0, :-1], lay.n[0, 1:]
        e = (torch.searchsorted(self.nc, u, right=True) - 1).clamp(0, self.nb - 1)  # the first non-empty bin from u
        single = (self.nc[e] == u) & (self.nc[e + 1] == v) & self.coarse[e]
        bins = e[kept[0] & single]
        return self.make_fine(bins) if bins.numel() else False


def _native_binned(x, k):
    """The compiled search's result for one float32 row, or None (not built, turned off, or k out of range)."""
    if not 2 <= k <= _NATIVE_MAX_K:
        return None
    from .. import kernels  # optional compiled ops (they depend on torch alone)

    return kernels.kmeans_binned(x, k)


def _binned_result(x, cut_n, cut_s, nt, st):
    z = torch.zeros(1, dtype=_F64)
    cnt = torch.cat([z, cut_n, nt]).diff().unsqueeze(0)
    sm = torch.cat([z, cut_s, st]).diff().unsqueeze(0)
    inertia = (_sum_of_squares(x) - _val(cnt, sm).sum(1)).clamp(min=0)
    counts, _, centers = _canonical(cnt, sm)
    return centers, counts.to(torch.int64), inertia


def _separated(cut_n, cut_s, nt, st, lo, hi):
    """The centres' midpoints separate the values on either side of every cut (or a cluster is empty)."""
    z = torch.zeros(1, dtype=_F64)
    cnt = torch.cat([z, cut_n, nt]).diff()
    if bool((cnt == 0).any()):
        return True
    b = _midpoints((torch.cat([z, cut_s, st]).diff() / cnt).unsqueeze(0))[0]
    return bool((hi <= b).all()) and bool((lo > b).all())


def _cluster_binned(x, k, max_iter):
    out = _native_binned(x, k)
    if out is not None:
        k1 = k - 1
        st, cut_n, cut_s, lo, hi = out[:1], *out[1:].view(4, k1).unbind()
        nt = torch.tensor([float(x.numel())], dtype=_F64)
        if not _separated(cut_n, cut_s, nt, st, lo, hi):
            return _cluster_sorted(x.to(_F64).unsqueeze(0), k, max_iter)
        return _binned_result(x, cut_n, cut_s, nt, st)
    src = _BinnedSource(x)
    cut_n = cut_s = torch.zeros(0, dtype=_F64)
    if k > 1:
        cuts, rlo, rhi = _start(src, k)
        # the best bin edges within two quantile steps of the best quantile cuts
        step = 2.0 * float(src.nt) / (4 * _START_ITEMS)
        wlo, whi = torch.maximum(cuts - step, rlo), torch.minimum(cuts + step, rhi)
        lays = [src.range_layout(wlo[:, j], whi[:, j]) for j in range(k - 1)]
        _, idx = _best_cuts(lays, [lay.ok for lay in lays], src.nt, src.st)
        cuts = torch.cat([lay.n.gather(1, idx[:, j : j + 1]) for j, lay in enumerate(lays)], 1)
        e = torch.searchsorted(src.nc, cuts[0])  # a cut on edge e lies between bins e - 1 and e
        bins = (e.unsqueeze(1) + torch.arange(-_READ_BINS, _READ_BINS)).clamp(0, src.nb - 1)
        lo = torch.maximum(src.nc[(e - _READ_BINS).clamp(min=0)].unsqueeze(0), rlo)
        hi = torch.minimum(src.nc[(e + _READ_BINS).clamp(max=src.nb)].unsqueeze(0), rhi)
        src.make_fine(bins.flatten())
        cuts = _coordinate_ascent(src, cuts, lo, hi)
        for _ in range(64):
            _, cuts = _certify(src, cuts, rlo, rhi)
            cut_n = cuts[0]
            rec = src._records(cut_n)
            cut_s = rec.s
            # boundaries must separate the values next to each cut; neighbour bins not read yet
            # (their values known only up to the bin's hull) are read first
            if _separated(cut_n, cut_s, src.nc[-1:], src.sc[-1:], rec.lo, rec.hi):
                break
            e = torch.searchsorted(src.nc, cut_n)  # the non-empty bins on either side of edge e
            near = torch.cat([src.prv[e], src.nxt[e]])
            if not src.make_fine(near[(src.counts[near] > 0) & ~src.fine[near]]):
                return _cluster_sorted(x.to(_F64).unsqueeze(0), k, max_iter)
    return _binned_result(x, cut_n, cut_s, src.nc[-1:], src.sc[-1:])
