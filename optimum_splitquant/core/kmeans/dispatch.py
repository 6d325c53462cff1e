"""The entry point :func:`kmeans_1d`: input checks, and the choice between the sorted search, the
binned search (compiled when the optional kernels are built, else pure torch) and the dynamic programme.
"""

from __future__ import annotations

import math

import torch

from .binned_search import _binned_result, _cluster_binned, _separated
from .bounds import _F64
from .dp import _cluster_dc
from .partition import KMeans1D, _midpoints
from .sorted_search import _cluster_sorted

__all__ = ["kmeans_1d"]

_MAX_ITER = 300
_BINNED_MIN_N = 1 << 15  # float32/16 rows at least this long are binned instead of sorted
# Many clusters: the pruning search grows fast with k, the divide-and-conquer DP does not.
_DC_MIN_K = 10
_DC_MIN_K_MID_ROWS = 6  # ... and from k = 6 on binned-length rows shorter than:
_DC_MAX_N_MID_K = 1 << 18
_DC_MIN_K_SORTED = 4  # ... and from k = 4 on sorted rows (short rows, per-channel batches, float64)
_NATIVE_MAX_K = _DC_MIN_K - 1  # the compiled binned search (kernels/kmeans_cpu.cpp): every binned k from 2


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
        dc_from = _DC_MIN_K_MID_ROWS if n < _DC_MAX_N_MID_K else _DC_MIN_K
        if k >= _DC_MIN_K or k >= (dc_from if binned else _DC_MIN_K_SORTED):
            centers, counts, inertia = _cluster_dc(x.to(_F64), k, max_iter)
        elif binned:
            parts = [_cluster_binned_row(x[g].to(torch.float32).contiguous(), k, max_iter) for g in range(rows)]
            centers, counts, inertia = (torch.cat(t) for t in zip(*parts, strict=True))
        else:
            centers, counts, inertia = _cluster_sorted(x.to(_F64), k, max_iter)
        bounds = _midpoints(centers)
    return KMeans1D(centers=centers.clone(), boundaries=bounds.clone(), counts=counts.clone(), inertia=inertia.clone())


def _native_binned(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """The compiled search's result for one float32 row, or None (not built, turned off, or k out of range)."""
    if not 2 <= k <= _NATIVE_MAX_K:
        return None
    from ... import kernels  # optional compiled ops (they depend on torch alone)

    return kernels.kmeans_binned(x, k)


def _cluster_binned_row(x: torch.Tensor, k: int, max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One float32 row: the compiled search's cuts when it runs, else the pure-torch search."""
    out = _native_binned(x, k)
    if out is None:
        return _cluster_binned(x, k, max_iter)
    st, cut_n, cut_s, lo, hi = out[:1], *out[1:].view(4, k - 1).unbind()
    nt = torch.tensor([float(x.numel())], dtype=_F64)
    if not _separated(cut_n, cut_s, nt, st, lo, hi):
        return _cluster_sorted(x.to(_F64).unsqueeze(0), k, max_iter)
    return _binned_result(x, cut_n, cut_s, nt, st)
