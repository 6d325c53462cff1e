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
* Sorted rows (float64, short rows, per-channel batches; ``k <= 3``): the positions are those between
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

  When the bound cannot prune (a few far outliers: the certificate layout grows past 256
  positions per cut, or its pairwise tables past 2^26 values), the cuts come from the dynamic
  programme below over the sorted row instead (memory ``O(k n)``), and the bins holding them are
  read as the search would: the same cuts, the same bits.

* Compiled search: when the optional CPU kernels are built (:mod:`optimum_splitquant.kernels`),
  binned rows (``k <= 9``) are searched by ``kernels/kmeans_cpu.cpp`` (same bins, same bound,
  plain loops). Prefix sums at positions inside read bins are ``sum of the bins before + exact sum
  of the bin's values before`` in both searches, so they return the same bits.

* Many clusters (``k >= 10``, ``k >= 6`` on binned-length rows shorter than ``2**18``, ``k >= 4``
  on sorted rows): the pruning search grows fast with ``k`` (per-channel batches at k = 8: minutes
  for a 1536x384 weight), so the rows are sorted and solved by the classic dynamic
  programme with divide and conquer (the optimal last cut is monotone), ``O(k n log n)``; its
  layers run compiled (``kernels/kmeans_dp_cpu.cpp``, the same cuts) when the kernels are built.

``values`` of shape ``(G, n)`` gives ``G`` independent clusterings (``G = 1`` for a whole tensor,
``G = rows`` for per-output-channel clustering); a row gets bit-identical results alone or in a
batch, on any thread count. Ties in the optimum go to the first partition in position order.

Convention: a value ``v`` belongs to cluster ``j`` when ``b[j - 1] < v <= b[j]`` for the sorted
boundaries ``b`` (midpoints between consecutive centres), i.e. ``j = searchsorted(b, v, left)``.

Modules: :mod:`.dispatch` (:func:`kmeans_1d`, the choice of search), :mod:`.partition` (the result,
:func:`assign_clusters`), :mod:`.bounds` (layouts, the chain DP and the lower bound), :mod:`.sorted_search`,
:mod:`.binned_source` (bins and their cut positions), :mod:`.binned_search` and :mod:`.dp`.
"""

from __future__ import annotations

from .binned_source import _sums_before as _sums_before
from .dispatch import kmeans_1d
from .partition import KMeans1D, assign_clusters

__all__ = ["KMeans1D", "assign_clusters", "kmeans_1d"]
