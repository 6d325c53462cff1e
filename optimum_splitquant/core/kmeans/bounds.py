"""Lower-bound machinery shared by the sorted and the binned search.

Candidate cut positions are laid out as prefix statistics (:class:`_Layout`); the exact chain DP
over them (:func:`_best_cuts`) gives the best partition they allow, and :func:`_keep_items` drops
the items (consecutive positions) that cannot hold an optimal cut: see "Lower bound" in the
package docstring (:mod:`optimum_splitquant.core.kmeans`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

__all__: list[str] = []

_F64 = torch.float64
_NEG = float("-inf")
_TOL = 1e-11  # relative slack of the pruning test (rounding), times an upper bound of sum x^2


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


class _Source(Protocol):
    """Candidate cut positions of ``G`` rows (:class:`~.sorted_search._SortedSource`, :class:`~.binned_source._BinnedSource`).

    nt, st: ``(G, 1)`` count and sum of each row; q_bound: ``(G,)`` or ``(1,)`` upper bound of its sum of squares.
    """

    nt: torch.Tensor
    st: torch.Tensor
    q_bound: torch.Tensor

    def layout(self, targets: torch.Tensor) -> _Layout:
        """The valid positions at or just after the target counts ``(G, T)``."""
        ...

    def range_layout(self, lo: torch.Tensor, hi: torch.Tensor) -> _Layout:
        """Every valid position with a count in ``[lo, hi]`` (each ``(G,)``)."""
        ...


def _best_cuts(
    lays: list[_Layout], okcut: list[torch.Tensor], nt: torch.Tensor, st: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact best partition with cut j at a position of lays[j] allowed by okcut[j] (chain DP).

    Returns (value (G,), cut counts (G, k - 1)); value = sum of S^2/N."""
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
    picks = [*_backtrack(backs, idx), idx]
    return best, torch.cat([lay.n.gather(1, i) for lay, i in zip(lays, picks, strict=True)], 1)


def _backtrack(args: list[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    """Back pointers ``args`` (one ``(G, P)`` table per layer) followed from ``idx`` ``(G, 1)``, picked in
    the last layer: the index picked in each layer before it, in layer order."""
    picks = []
    for arg in reversed(args):
        idx = arg.gather(1, idx)
        picks.append(idx)
    picks.reverse()
    return picks


def _best_in_ranges(src: _Source, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Exact best cuts (counts ``(G, k - 1)``) with cut ``j`` at any position in ``[lo[:, j], hi[:, j]]``."""
    lays = [src.range_layout(lo[:, j], hi[:, j]) for j in range(lo.shape[1])]
    return _best_cuts(lays, [lay.ok for lay in lays], src.nt, src.st)[1]


def _prune_pass(
    lays: list[_Layout],
    lo: torch.Tensor,
    hi: torch.Tensor,
    cuts: torch.Tensor,
    best: torch.Tensor,
    nt: torch.Tensor,
    st: torch.Tensor,
    tol: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One pruning pass over layouts whose cut ``j`` must lie in ``[lo[:, j], hi[:, j]]``.

    The best partition over the layouts' positions improves the incumbent (``cuts``, score
    ``best``); returns it with, per cut, the items that may still hold an optimal cut.
    """
    k1 = len(lays)
    rl = [lo[:, j : j + 1] for j in range(k1)]
    rh = [hi[:, j : j + 1] for j in range(k1)]
    okcut = [lay.ok & (lay.n >= a) & (lay.n <= b) for lay, a, b in zip(lays, rl, rh, strict=True)]
    val, found = _best_cuts(lays, okcut, nt, st)
    better = val > best
    best = torch.where(better, val, best)
    cuts = torch.where(better.unsqueeze(1), found, cuts)
    okitem = []
    for lay, a, b in zip(lays, rl, rh, strict=True):
        nu, nv = lay.n[:, :-1], lay.n[:, 1:]
        okitem.append(lay.ok[:, :-1] & lay.ok[:, 1:] & (nv > nu) & (nu >= a) & (nv <= b))
    return cuts, best, _keep_items(lays, okitem, nt, st, best - tol)


def _pair_terms(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], shared: bool) -> tuple[torch.Tensor, ...]:
    """Bound terms of each (item a of one cut, item b of the next) pair, ``(G, Ia, Ib)``: ``base`` (the
    core between them, plus b's values as a core would bound them) and the pulls ``w_ll``, ``w_rl``,
    ``w_rr`` for the sides the items take; ``same`` (``(1, Ia, Ib)``, or None): a and b are one item
    (``shared`` layout); ``order``: a cut in a can precede one in b."""
    au, _, av, asv, _, _, ahi = a
    bu, bsu, bv, _, bq, blo, _ = b
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
    same = None
    if shared:
        i = torch.arange(au.shape[1], device=au.device)
        same = (i.unsqueeze(1) == i.unsqueeze(0)).unsqueeze(0)
    return base, w_ll, w_rl, w_rr, same, au.unsqueeze(2) < bv.unsqueeze(1)


def _keep_items(
    lays: list[_Layout], okitem: list[torch.Tensor], nt: torch.Tensor, st: torch.Tensor, thresh: torch.Tensor
) -> list[torch.Tensor]:
    """Items (consecutive positions of lays[j]) that may hold cut j of a partition whose score
    (sum of S^2/N) reaches ``thresh``; see the package docstring for the bound."""
    g = lays[0].n.shape[0]
    items = [
        (lay.n[:, :-1], lay.s[:, :-1], lay.n[:, 1:], lay.s[:, 1:], lay.q.diff(dim=1), lay.lo[:, :-1], lay.hi[:, 1:])
        for lay in lays
    ]
    # first core [0, u) takes the item on side "left"; the last core [v, end) on side "right"
    nu, su, nv, _, qi, lo, _ = items[0]
    head = _val(nu, su) + qi
    head = torch.stack([head - _pull(nu, nv - nu, lo - su / nu.clamp(min=1.0)), head], 2).reshape(g, -1)
    nu, _, nv, sv, _, _, hi = items[-1]
    nz, sz = nt - nv, st - sv
    tail = _val(nz, sz)
    tail = torch.stack([tail, tail - _pull(nz, nv - nu, sz / nz.clamp(min=1.0) - hi)], 2).reshape(g, -1)
    if len(lays) == 2:  # k = 3: the four side pairs of each (item a, item b) pair directly, twice as fast as the DP
        base, w_ll, w_rl, w_rr, same, order = _pair_terms(items[0], items[1], lays[0] is lays[1])
        hl, hr = head.view(g, -1, 2).unsqueeze(2).unbind(-1)
        tl, tr = tail.view(g, -1, 2).unsqueeze(1).unbind(-1)
        score = torch.maximum(torch.maximum(hl - w_ll + tl, hl + tr), torch.maximum(hr - w_rl + tl, hr - w_rr + tr))
        score = score + base
        if same is not None:  # both cuts in one item: the item counted once, no pulls
            score = torch.where(same, hr + tl, score)
        score = score.masked_fill(~(order & okitem[0].unsqueeze(2) & okitem[1].unsqueeze(1)), _NEG)
        th = thresh.view(-1, 1)
        return [okitem[0] & (score.amax(2) >= th), okitem[1] & (score.amax(1) >= th)]
    gains = []
    for j in range(len(lays) - 1):
        base, w_ll, w_rl, w_rr, same, order = _pair_terms(items[j], items[j + 1], lays[j] is lays[j + 1])
        gain = torch.stack([base - w_ll, base, base - w_rl, base - w_rr], -1)  # sides of (a, b): LL LR RL RR
        if same is not None:  # both cuts in one item cost nothing extra
            gain = torch.where(same.unsqueeze(-1), 0.0, gain)
        gain = gain.masked_fill(~order.unsqueeze(-1), _NEG)
        ia, ib = base.shape[1], base.shape[2]
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


def _regions(lays: list[_Layout], keeps: list[torch.Tensor], cuts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cut, the span ``[lo, hi]`` (each ``(G, k - 1)``) of its kept items, widened to hold the incumbent ``cuts``."""
    lo = torch.stack([torch.where(kp, lay.n[:, :-1], math.inf).amin(1) for lay, kp in zip(lays, keeps, strict=True)], 1)
    hi = torch.stack([torch.where(kp, lay.n[:, 1:], -1.0).amax(1) for lay, kp in zip(lays, keeps, strict=True)], 1)
    return torch.minimum(lo, cuts), torch.maximum(hi, cuts)


def _layouts(src: _Source, targets: list[torch.Tensor], overlap: bool) -> list[_Layout]:
    """One layout per cut; one shared by all cuts when their regions overlap (so that items of
    different cuts are either equal or disjoint, which keeps the bound tight)."""
    if overlap:
        return [src.layout(torch.cat(targets, 1))] * len(targets)
    return [src.layout(t) for t in targets]
