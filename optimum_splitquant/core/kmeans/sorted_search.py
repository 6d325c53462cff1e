"""Sorted rows (float64, short rows, per-channel batches): candidate cuts lie between distinct sorted
values; pruning passes over equal items shrink each cut's region until it is searched exhaustively.
See "Sorted rows" in the package docstring (:mod:`optimum_splitquant.core.kmeans`).
"""

from __future__ import annotations

import math

import torch

from .bounds import _F64, _NEG, _TOL, _best_in_ranges, _Layout, _layouts, _prune_pass, _regions
from .dp import _dc_cuts
from .partition import _finish_sorted, _sorted_prefix

__all__: list[str] = []

_ZOOM_ITEMS = 16  # items per region in each later pruning pass of sorted rows
_EXHAUSTIVE = 32  # regions at most this wide are searched position by position
_MAX_ZOOM_ITEMS = 256  # rows still stuck at this many items per region take their cuts from the DP


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
    return cuts, *_regions(lays, keeps, cuts), best


def _solve_rows(src, cuts, lo, hi, items=_ZOOM_ITEMS, max_levels=64):
    """Exact best cuts (counts) of every row of a sorted source, given regions holding them:
    regions shrink by pruning passes until they are small, then all position pairs are searched.
    Rows move on independently (a row whose regions stop shrinking continues alone with finer
    items), so one hard row does not pad the work of the others."""
    g = cuts.shape[0]
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
            out[todo[rows]] = _best_in_ranges(sub, lo[rows], hi[rows])
        if bool(stuck.any()):
            rows = stuck.nonzero().flatten()
            if items * 4 > _MAX_ZOOM_ITEMS:  # the bound cannot prune (far outliers): the dynamic programme
                out[todo[rows]] = _dc_cuts(src.s[rows], cuts.shape[1] + 1).to(out.dtype)
            else:
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


def _cluster_sorted(x: torch.Tensor, k: int, max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres, counts and inertia of the optimal partition of each float64 row of ``x`` ``(G, n)``."""
    s, sc, qc = _sorted_prefix(x)
    g, n = s.shape
    if k == 1:
        cuts = torch.zeros(g, 0, dtype=torch.int64, device=x.device)
    else:
        src = _SortedSource(s, sc, qc)
        lo = torch.zeros(g, k - 1, dtype=_F64, device=x.device)
        hi = torch.full_like(lo, float(n))
        cuts = _solve_rows(src, lo.clone(), lo, hi).to(torch.int64)
    return _finish_sorted(s, sc, qc, cuts, max_iter)
