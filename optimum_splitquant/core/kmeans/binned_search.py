"""Binned rows, the pure-torch search: the best partition over quantile positions and one pruning
pass bound each cut's region; bins around the best edges are read, coordinate ascent gives the
incumbent, and a layout dense near each cut and growing geometrically further out certifies it.
See "Binned rows" in the package docstring (:mod:`optimum_splitquant.core.kmeans`).
"""

from __future__ import annotations

import bisect
import math

import torch

from .binned_source import _BinnedSource, _sum_of_squares
from .bounds import _F64, _NEG, _TOL, _best_cuts, _best_in_ranges, _keep_items, _layouts, _prune_pass, _regions, _val
from .dp import _dc_cuts
from .partition import _canonical, _midpoints
from .sorted_search import _cluster_sorted

__all__: list[str] = []

_READ_BINS = 3  # bins read on each side of the best bin edges before the exact search
_START_ITEMS = 32  # quantile items of the first, global pruning pass
_DENSE = 32  # single-value items on each side of an incumbent cut in the certificate layout
_GROWTH = 1.2  # then items grow by this factor with their distance from the cut
# Certificate layouts of at most this many positions per cut (a layout shared by all cuts: times k - 1),
# and the bound's pairwise tables ((2 P)^2 float64 values per pair of consecutive cuts, and a few
# temporaries of P^2) within 2^26 values (512 MB); past either, the dynamic programme over the sorted
# row finds the cuts (a few far outliers: the bound cannot prune, and the layouts keep growing).
_POSITIONS_PER_CUT = 256
_PAIR_VALUES = 1 << 26


def _max_positions(k1):
    """Most positions a certificate layout of ``k1`` cuts may have."""
    return min(_POSITIONS_PER_CUT * k1, math.isqrt(_PAIR_VALUES // (4 * max(k1 - 1, 1))))


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
    best, cuts = _best_cuts([fine] * (k - 1), [fine.ok] * (k - 1), src.nt, src.st)
    lay = src.layout(q[:, ::4])
    lays = [lay] * (k - 1)
    nu, nv = lay.n[:, :-1], lay.n[:, 1:]
    itm = lay.ok[:, :-1] & lay.ok[:, 1:] & (nv > nu)
    keeps = _keep_items(lays, [itm] * (k - 1), src.nt, src.st, best - _TOL * src.q_bound)
    return cuts, *_regions(lays, keeps, cuts)


def _certify(src, cuts, lo, hi, max_levels=64):
    """Exact best cuts (counts), given an incumbent and regions known to hold the optimal cuts; None
    when a layout grows past _max_positions (the bound cannot prune: its pairwise tables would not fit)."""
    g, k1 = cuts.shape
    nt, st = src.nt, src.st
    tol = _TOL * src.q_bound
    best = torch.full((g,), _NEG, dtype=_F64, device=cuts.device)
    targets = [_around(cuts[:, j], lo[:, j], hi[:, j]) for j in range(k1)]
    for _ in range(max_levels):
        lays = _layouts(src, targets, bool((hi[:, :-1] > lo[:, 1:]).any()))
        if max(lay.n.shape[1] for lay in lays) > _max_positions(k1):
            return None
        cuts, best, keeps = _prune_pass(lays, lo, hi, cuts, best, nt, st, tol)
        for lay, kp in zip(lays, keeps, strict=True):
            src.expand(lay, kp)  # kept single coarse bins: read their values
        splits = [src.split_points(lay) for lay in lays]
        opened = [kp & (sp < lay.n[:, 1:]) for lay, kp, sp in zip(lays, keeps, splits, strict=True)]
        if not any(bool(o.any()) for o in opened):
            return best, cuts
        lo, hi = _regions(lays, keeps, cuts)
        targets = []
        for j, (lay, op, sp) in enumerate(zip(lays, opened, splits, strict=True)):
            fill = lo[:, j : j + 1]
            inside = lay.ok & (lay.n >= fill) & (lay.n <= hi[:, j : j + 1])
            keep_pos = torch.where(inside, lay.n, fill)
            targets.append(torch.cat([keep_pos, torch.where(op, sp, fill), _around(cuts[:, j], lo[:, j], hi[:, j])], 1))
    raise RuntimeError("kmeans_1d: the exact search did not converge")


def _binned_result(
    x: torch.Tensor, cut_n: torch.Tensor, cut_s: torch.Tensor, nt: torch.Tensor, st: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres, counts and inertia of one float32 row ``x`` cut after ``cut_n`` values (whose sum is ``cut_s``)."""
    z = torch.zeros(1, dtype=_F64)
    cnt = torch.cat([z, cut_n, nt]).diff().unsqueeze(0)
    sm = torch.cat([z, cut_s, st]).diff().unsqueeze(0)
    inertia = (_sum_of_squares(x) - _val(cnt, sm).sum(1)).clamp(min=0)
    counts, _, centers = _canonical(cnt, sm)
    return centers, counts.to(torch.int64), inertia


def _separated(
    cut_n: torch.Tensor, cut_s: torch.Tensor, nt: torch.Tensor, st: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> bool:
    """The centres' midpoints separate the values on either side of every cut (or a cluster is empty)."""
    z = torch.zeros(1, dtype=_F64)
    cnt = torch.cat([z, cut_n, nt]).diff()
    if bool((cnt == 0).any()):
        return True
    b = _midpoints((torch.cat([z, cut_s, st]).diff() / cnt).unsqueeze(0))[0]
    return bool((hi <= b).all()) and bool((lo > b).all())


def _cluster_binned(x: torch.Tensor, k: int, max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres, counts and inertia of the optimal partition of one float32 row ``x`` ``(n,)``, by the torch search."""
    src = _BinnedSource(x)
    cut_n = cut_s = torch.zeros(0, dtype=_F64)
    if k > 1:
        cuts, rlo, rhi = _start(src, k)
        # the best bin edges within two quantile steps of the best quantile cuts
        step = 2.0 * float(src.nt) / (4 * _START_ITEMS)
        wlo, whi = torch.maximum(cuts - step, rlo), torch.minimum(cuts + step, rhi)
        cuts = _best_in_ranges(src, wlo, whi)
        e = torch.searchsorted(src.nc, cuts[0])  # a cut on edge e lies between bins e - 1 and e
        bins = (e.unsqueeze(1) + torch.arange(-_READ_BINS, _READ_BINS)).clamp(0, src.nb - 1)
        lo = torch.maximum(src.nc[(e - _READ_BINS).clamp(min=0)].unsqueeze(0), rlo)
        hi = torch.minimum(src.nc[(e + _READ_BINS).clamp(max=src.nb)].unsqueeze(0), rhi)
        src.make_fine(bins.flatten())
        cuts = _coordinate_ascent(src, cuts, lo, hi)
        for _ in range(64):
            found = _certify(src, cuts, rlo, rhi)
            if found is None:
                return _cluster_binned_by_dp(x, src, k, max_iter)
            cuts = found[1]
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


def _cluster_binned_by_dp(x, src, k, max_iter):
    """The optimal cuts of one float32 row by the dynamic programme over its sorted values (memory
    ``O(k n)``), for rows whose certificate outgrows its tables; the result is then read from the bins
    as the search would give it: the bins holding the cuts and their neighbours are read first."""
    cut_n = _dc_cuts(torch.sort(x.to(_F64)).values.unsqueeze(0), k)[0].to(_F64)
    inside = (torch.searchsorted(src.nc, cut_n, right=True) - 1).clamp(0, src.nb - 1)
    src.make_fine(inside[src.nc[inside] < cut_n])
    e = torch.searchsorted(src.nc, cut_n)
    near = torch.cat([src.prv[e], src.nxt[e]])
    src.make_fine(near[(src.counts[near] > 0) & ~src.fine[near]])
    if not bool(torch.isin(cut_n, torch.cat([src.nc, src._raw_n])).all()):  # a cut between equal values
        return _cluster_sorted(x.to(_F64).unsqueeze(0), k, max_iter)
    rec = src._records(cut_n)
    if not _separated(cut_n, rec.s, src.nc[-1:], src.sc[-1:], rec.lo, rec.hi):
        return _cluster_sorted(x.to(_F64).unsqueeze(0), k, max_iter)
    return _binned_result(x, cut_n, rec.s, src.nc[-1:], src.sc[-1:])
