"""Binned rows, their cut positions: log-spaced bins of the order-preserving integer keys of a
float32 row, bin edges as candidate cuts, and "fine" bins whose distinct values are read from the
data. See "Binned rows" in the package docstring (:mod:`optimum_splitquant.core.kmeans`).
"""

from __future__ import annotations

import math

import torch

from .bounds import _F64, _Layout

__all__: list[str] = []

_LOG2_BINS = 13  # about 2^13 bins per row over the magnitudes within 2^9 of the largest one
_NORM_CHUNK = 4096


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


def _closest_inside(u, v, mid, down, up):
    """Of the candidate splits (largest valid <= mid, smallest valid > mid) the one nearest to mid
    strictly inside (u, v); v when the item has no valid position inside."""
    down_ok = down > u
    up_ok = up < v
    pick_down = down_ok & (~up_ok | (mid - down <= up - mid))
    return torch.where(pick_down, down, torch.where(up_ok, up, v))


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
