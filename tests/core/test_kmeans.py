"""Exact 1-D k-means: optimality against scikit-learn on real weights, invariants, degenerate inputs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from optimum_splitquant.core import assign_clusters, kmeans_1d
from tests.helpers import minilm_linear_weights


def recomputed_inertia(values: torch.Tensor, centers: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Sum of squared distances to the assigned centre, computed directly (float64, per row)."""
    v = values.to(torch.float64).reshape(centers.shape[0], -1)
    ids = assign_clusters(v, boundaries)
    return ((v - centers.gather(1, ids)) ** 2).sum(dim=1)


def check_invariants(values: torch.Tensor, k: int) -> None:
    """Properties every result must satisfy, for ``values`` of shape ``(n,)`` or ``(G, n)``."""
    v = values.reshape(-1, values.shape[-1]).to(torch.float64)
    rows, n = v.shape
    r = kmeans_1d(values, k)
    assert r.centers.shape == (rows, k) and r.centers.dtype == torch.float64
    assert r.boundaries.shape == (rows, k - 1) and r.boundaries.dtype == torch.float64
    assert r.counts.shape == (rows, k) and r.counts.dtype == torch.int64
    assert r.inertia.shape == (rows,) and r.inertia.dtype == torch.float64
    for t in (r.centers, r.boundaries, r.inertia):
        assert bool(torch.isfinite(t).all()), "NaN or inf in the result"
    assert bool((r.centers.diff(dim=1) >= 0).all()), "centres are not sorted"
    assert torch.equal(r.boundaries, (r.centers[:, :-1] + r.centers[:, 1:]) / 2)
    assert torch.equal(r.counts.sum(dim=1), torch.full((rows,), n, dtype=torch.int64))
    assert bool((r.counts >= 0).all())
    ids = assign_clusters(v, r.boundaries)
    assert ids.shape == (rows, n)
    bincount = torch.stack([torch.bincount(row, minlength=k) for row in ids])
    assert torch.equal(bincount, r.counts), "counts disagree with assign_clusters"
    # Lloyd fixed point: a non-empty cluster's centre is the mean of its members.
    for g in range(rows):
        for j in range(k):
            members = v[g][ids[g] == j]
            if members.numel():
                torch.testing.assert_close(r.centers[g, j], members.mean(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(r.inertia, recomputed_inertia(v, r.centers, r.boundaries), rtol=1e-9, atol=1e-12)
    assert bool((r.inertia >= 0).all())


def test_matches_or_beats_sklearn_on_real_minilm_weights() -> None:
    weights = minilm_linear_weights()
    assert len(weights) == 37
    worst_ratio, worst_name = -math.inf, ""
    for name, w in weights.items():
        x = w.flatten()
        ours = kmeans_1d(x, 3)
        direct = float(recomputed_inertia(x, ours.centers, ours.boundaries)[0])
        assert float(ours.inertia[0]) == pytest.approx(direct, rel=1e-9), name
        # One OpenMP thread: on a busy 2-core machine sklearn's thread pool oversubscribes (4x slower).
        with threadpool_limits(1):
            ref = KMeans(3, n_init="auto", random_state=0).fit(x.to(torch.float64).numpy().reshape(-1, 1))
        ratio = float(ours.inertia[0]) / ref.inertia_
        if ratio > worst_ratio:
            worst_ratio, worst_name = ratio, name
        assert ratio <= 1 + 1e-6, f"{name}: kmeans_1d inertia {float(ours.inertia[0])} > sklearn {ref.inertia_}"
        assert int(ours.counts.sum()) == x.numel()
    print(f"\nworst kmeans_1d / sklearn inertia ratio over 37 MiniLM weights: {worst_ratio:.9f} ({worst_name})")


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 16], ids=lambda k: f"k{k}")
def test_invariants_random(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    values = torch.cat([torch.randn(300, generator=gen), 6 + 0.1 * torch.randn(20, generator=gen)])
    check_invariants(values, k)
    check_invariants(values.reshape(4, 80), k)


@pytest.mark.parametrize("k", [2, 3, 5], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_per_row_equals_rows_separately(k: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(10 + k)
    values = (torch.randn(6, 200, generator=gen) * torch.linspace(0.1, 3.0, 6)[:, None]).to(dtype)
    values[2, :50] += 8  # one row with an outlier mass, so rows converge after different numbers of iterations
    batched = kmeans_1d(values, k)
    for g in range(values.shape[0]):
        single = kmeans_1d(values[g], k)
        for field in ("centers", "boundaries", "counts", "inertia"):
            assert torch.equal(getattr(batched, field)[g], getattr(single, field)[0]), (g, field)


def test_deterministic() -> None:
    values = minilm_linear_weights()["encoder.layer.0.attention.self.query.weight"]
    a, b = kmeans_1d(values.flatten(), 3), kmeans_1d(values.flatten(), 3)
    c, d = kmeans_1d(values, 4), kmeans_1d(values, 4)
    for field in ("centers", "boundaries", "counts", "inertia"):
        assert torch.equal(getattr(a, field), getattr(b, field))
        assert torch.equal(getattr(c, field), getattr(d, field))


@pytest.mark.parametrize("k", [2, 3, 8], ids=lambda k: f"k{k}")
def test_invariant_to_permutation(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    values = torch.randn(1000, generator=gen) ** 3
    perm = torch.randperm(values.numel(), generator=gen)
    a, b = kmeans_1d(values, k), kmeans_1d(values[perm], k)
    for field in ("centers", "boundaries", "counts", "inertia"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_k1_is_the_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 500, generator=gen, dtype=torch.float64) + torch.tensor([[0.0], [5.0], [-2.0]])
    r = kmeans_1d(values, 1)
    torch.testing.assert_close(r.centers[:, 0], values.mean(dim=1), rtol=1e-12, atol=1e-14)
    assert r.boundaries.shape == (3, 0)
    assert r.counts.tolist() == [[500]] * 3
    expected = ((values - values.mean(dim=1, keepdim=True)) ** 2).sum(dim=1)
    torch.testing.assert_close(r.inertia, expected, rtol=1e-9, atol=1e-12)


def test_separated_groups_are_found() -> None:
    values = torch.tensor([-10.0, -10.5, -9.5, 0.0, 0.25, -0.25, 0.5, 20.0, 21.0])
    r = kmeans_1d(values, 3)
    assert r.counts.tolist() == [[3, 4, 2]]
    torch.testing.assert_close(r.centers, torch.tensor([[-10.0, 0.125, 20.5]], dtype=torch.float64))


@pytest.mark.parametrize(
    ("values", "k", "counts"),
    [
        pytest.param([0.7] * 10, 3, None, id="constant-row"),
        pytest.param([0.0, 0.0, 1.0, 1.0], 3, None, id="two-distinct-k3"),
        pytest.param([2.5], 3, [[1, 0, 0]], id="n1-k3"),
        pytest.param([2.5], 1, [[1]], id="n1-k1"),
        pytest.param([-4.0, -4.0, -4.0], 16, None, id="single-value-k16"),
        pytest.param([0.0, 1.0, 2.0], 3, [[1, 1, 1]], id="n-equals-k"),
        pytest.param([0.0, 1e-30, 1.0, 1.0 + 1e-12], 2, [[2, 2]], id="tiny-gaps"),
    ],
)
def test_degenerate_inputs(values: list[float], k: int, counts: list[list[int]] | None) -> None:
    t = torch.tensor(values, dtype=torch.float64)
    check_invariants(t, k)
    r = kmeans_1d(t, k)
    distinct = torch.unique(t).numel()
    assert int((r.counts > 0).sum()) == min(distinct, k)
    if distinct <= k:
        assert float(r.inertia[0]) == 0.0
    if counts is not None:
        assert r.counts.tolist() == counts


def test_degenerate_rows_in_a_batch() -> None:
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    check_invariants(values, 3)
    r = kmeans_1d(values, 3)
    assert r.inertia[:2].tolist() == [0.0, 0.0]
    assert (r.counts > 0).sum(dim=1).tolist() == [1, 2, 3]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_raises(bad: float) -> None:
    values = torch.tensor([[0.0, 1.0, bad, 2.0]])
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans_1d(values, 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans_1d(values[0], 1)


@pytest.mark.parametrize("k", [0, -1, True, 2.0], ids=repr)
def test_bad_k_raises(k: object) -> None:
    with pytest.raises(ValueError, match="k must be"):
        kmeans_1d(torch.randn(10), k)  # type: ignore[arg-type]


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError):
        kmeans_1d(torch.randn(2, 3, 4), 2)
    with pytest.raises(ValueError):
        kmeans_1d(torch.empty(0), 2)
    with pytest.raises(ValueError):
        kmeans_1d(torch.empty(3, 0), 2)


def test_integer_input_is_accepted() -> None:
    r = kmeans_1d(torch.tensor([0, 0, 10, 10, 11]), 2)
    assert r.counts.tolist() == [[2, 3]]
    torch.testing.assert_close(r.centers, torch.tensor([[0.0, 31 / 3]], dtype=torch.float64))


def test_assign_clusters_boundary_goes_to_lower_cluster() -> None:
    boundaries = torch.tensor([[0.5, 1.5]], dtype=torch.float64)
    values = torch.tensor(
        [[-100.0, 0.5, math.nextafter(0.5, 1.0), 1.5, math.nextafter(1.5, 2.0), 100.0]], dtype=torch.float64
    )
    assert assign_clusters(values, boundaries).tolist() == [[0, 0, 1, 1, 2, 2]]


def test_assign_clusters_float32_values_against_float64_boundaries() -> None:
    # 0.1 in float32 is 0.100000001490116...; a float64 boundary just below it must send it up.
    v32 = torch.tensor([[0.1]], dtype=torch.float32)
    exact = float(v32)
    assert assign_clusters(v32, torch.tensor([[exact]], dtype=torch.float64)).tolist() == [[0]]
    assert assign_clusters(v32, torch.tensor([[math.nextafter(exact, 0.0)]], dtype=torch.float64)).tolist() == [[1]]


def test_assign_clusters_broadcasts_one_boundary_row_and_k1() -> None:
    values = torch.tensor([[0.0, 2.0], [3.0, -1.0]])
    assert assign_clusters(values, torch.tensor([[1.0]])).tolist() == [[0, 1], [1, 0]]
    assert assign_clusters(values, torch.tensor([[2.0], [3.0]])).tolist() == [[0, 0], [0, 0]]
    assert assign_clusters(values, torch.tensor([[-1.0], [-2.0]])).tolist() == [[1, 1], [1, 1]]
    ids = assign_clusters(values, torch.empty(1, 0))
    assert ids.dtype == torch.int64 and ids.tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize("k", [2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_assign_clusters_equals_searchsorted(k: int, dtype: torch.dtype) -> None:
    # Up to 7 boundaries are compared one by one (float32 values against the smallest float32 above
    # each float64 boundary); the ids must be those of searchsorted on float64, boundaries sitting
    # exactly on values, a float64 hair away from them, and past the float32 range included.
    gen = torch.Generator().manual_seed(k)
    for scale in (1e-6, 1.0, 1e3):
        values = (torch.randn(4, 3000, generator=gen) * scale).to(dtype)
        picks = values.flatten()[torch.randint(0, values.numel(), (4, k - 1), generator=gen)].to(torch.float64)
        hair = torch.randn(4, k - 1, generator=gen, dtype=torch.float64) * scale * 1e-12
        bounds = torch.sort(torch.where(torch.rand(4, k - 1, generator=gen) < 0.5, picks, picks + hair)).values
        if k == 2:
            bounds[3, 0] = -1e300
        for b in (bounds, bounds[:1]):
            expected = torch.searchsorted(b.expand(4, -1).contiguous(), values.to(torch.float64), right=False)
            assert torch.equal(assign_clusters(values, b), expected)


# ----------------------------------------------------------------------------------- exactness


def optimal_inertia(values: torch.Tensor, k: int) -> float:
    """The exact optimum by dynamic programming over the sorted values (an independent oracle).

    ``best[j][i]``: least SSE of the first ``i`` sorted values in ``j`` intervals. The optimal last
    cut is monotone in ``i`` (1-D k-means costs satisfy the quadrangle inequality), so each layer is
    computed by divide and conquer: ``O(k n log n)`` interval costs from float64 prefix sums.
    """
    s = torch.sort(values.flatten().to(torch.float64)).values
    n = s.numel()
    mean = s.mean()
    s = s - mean  # centred: smaller prefix sums, less cancellation in sum x^2 - S^2 / N
    ps = torch.cat([torch.zeros(1, dtype=torch.float64), s.cumsum(0)])
    pq = torch.cat([torch.zeros(1, dtype=torch.float64), (s * s).cumsum(0)])

    def cost(m: torch.Tensor, i: int) -> torch.Tensor:  # SSE of sorted values [m, i), for many m
        cnt = (i - m).to(torch.float64)
        sm = ps[i] - ps[m]
        return (pq[i] - pq[m]) - torch.where(cnt > 0, sm * sm / cnt.clamp(min=1), 0.0)

    counts = torch.arange(n + 1, dtype=torch.float64)
    prev = pq - torch.where(counts > 0, ps * ps / counts.clamp(min=1), 0.0)  # one interval [0, i)
    for _ in range(1, k):
        cur = torch.full((n + 1,), math.inf, dtype=torch.float64)
        stack = [(0, n, 0, n)]
        while stack:
            lo, hi, olo, ohi = stack.pop()
            if lo > hi:
                continue
            mid = (lo + hi) // 2
            m = torch.arange(olo, min(mid, ohi) + 1)
            vals = prev[m] + cost(m, mid)
            arg = int(torch.argmin(vals))
            cur[mid] = vals[arg]
            best_m = int(m[arg])
            stack.append((lo, mid - 1, olo, best_m))
            stack.append((mid + 1, hi, best_m, ohi))
        prev = cur
    return float(prev[n])


def exactness_rows() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    rows = {
        "gaussian": torch.randn(400, generator=gen),
        "student-t heavy tails": torch.distributions.StudentT(2.0).sample((400,)),
        "three well separated groups": torch.cat([torch.randn(150, generator=gen) * 0.1 + c for c in (-5.0, 0.0, 7.0)]),
        "few distinct values": (torch.randn(300, generator=gen) * 2).round(),
        # A shape where Lloyd from quantile starts stops at a local optimum: a dense bulk and
        # two small, unequal, far groups on one side.
        "lloyd trap": torch.cat(
            [
                torch.randn(300, generator=gen) * 0.05,
                torch.full((12,), 3.0),
                torch.full((3,), 9.0),
                torch.tensor([30.0]),
            ]
        ),
        "uniform": torch.rand(350, generator=gen),
        "one outlier": torch.cat([torch.randn(300, generator=gen), torch.tensor([1e3])]),
    }
    return {name: r.to(torch.float32) for name, r in rows.items()}


@pytest.mark.parametrize("k", [2, 3, 4, 6, 10, 16], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("name", list(exactness_rows()), ids=lambda s: s.replace(" ", "-"))
def test_inertia_is_the_global_optimum_sorted_rows(name: str, k: int) -> None:
    """Short rows (the sorted search): inertia equals the dynamic-programming optimum."""
    x = exactness_rows()[name]
    ours = float(kmeans_1d(x, k).inertia[0])
    best = optimal_inertia(x, k)
    assert ours == pytest.approx(best, rel=1e-9, abs=1e-12), f"{name}: {ours} vs optimum {best}"


@pytest.mark.parametrize(
    ("dist", "k"),
    [
        ("gaussian", 3),  # the oracle takes seconds a case: one by default
        pytest.param("student-t", 3, marks=pytest.mark.slow),
        pytest.param("mixture", 3, marks=pytest.mark.slow),
        pytest.param("student-t", 4, marks=pytest.mark.slow),
    ],
)
def test_inertia_is_the_global_optimum_binned_rows(dist: str, k: int) -> None:
    """Long float32 rows (the binned search, n >= 2**15): inertia equals the DP optimum."""
    gen = torch.Generator().manual_seed(11)
    n = 33_000  # just above the binned-path threshold (2**15)
    if dist == "gaussian":
        x = torch.randn(n, generator=gen) * 0.03
    elif dist == "student-t":
        torch.manual_seed(3)
        x = torch.distributions.StudentT(3.0).sample((n,)) * 0.02
    else:
        x = torch.cat([torch.randn(n - 300, generator=gen) * 0.02, torch.randn(300, generator=gen) * 0.01 + 0.4])
    x = x.to(torch.float32)
    result = kmeans_1d(x, k)
    ours = float(result.inertia[0])
    direct = float(recomputed_inertia(x, result.centers, result.boundaries)[0])
    best = optimal_inertia(x, k)
    assert ours == pytest.approx(direct, rel=1e-9)
    assert ours <= best * (1 + 1e-9), f"{dist}: {ours} vs optimum {best}"
    assert ours >= best * (1 - 1e-9), "below the optimum: the oracle or the inertia is wrong"


def binning_rows() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    n = 1 << 15
    return {
        "heavy tails over many binades": torch.randn(n, generator=gen) ** 5,
        "subnormals": torch.randn(n, generator=gen) * 1e-40,
        "narrow range, one binade": 1 + torch.rand(n, generator=gen) * 1e-4,
        "positive": torch.rand(n, generator=gen) + 3,
        "signed zeros and values": torch.where(
            torch.rand(n, generator=gen) < 0.5, torch.tensor(-0.0), torch.randn(n, generator=gen)
        ),
    }


@pytest.mark.parametrize("k", [2, 3], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("name", list(binning_rows()), ids=lambda s: s.replace(" ", "-").replace(",", ""))
def test_binned_rows_match_the_sorted_search(name: str, k: int) -> None:
    """Odd value ranges (many binades, subnormals, one narrow binade, one sign, signed zeros): the
    binned search (float32) finds the same partition as the sorted search of the same values, and
    the same centres whatever the order of the values."""
    x = binning_rows()[name].to(torch.float32)
    binned = kmeans_1d(x, k)
    exact = kmeans_1d(x.to(torch.float64), k)
    assert torch.equal(binned.counts, exact.counts), name
    # inertia = sum x^2 - sum S^2 / N: sum x^2 is rounded in data order, and cancels in a narrow range
    slack = 1e-12 * float(x.to(torch.float64).square().sum())
    assert float(binned.inertia[0]) == pytest.approx(float(exact.inertia[0]), rel=1e-9, abs=slack), name
    perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(1))
    shuffled = kmeans_1d(x[perm], k)
    for field in ("centers", "boundaries", "counts"):
        assert torch.equal(getattr(shuffled, field), getattr(binned, field)), field
    assert float(shuffled.inertia[0]) == pytest.approx(float(binned.inertia[0]), rel=1e-12, abs=slack)


def outlier_row(n: int = 40_000) -> torch.Tensor:
    """A narrow bulk and 20 far outliers: the bound cannot prune, the certificate outgrows its tables."""
    gen = torch.Generator().manual_seed(7)
    return torch.cat([torch.randn(n - 20, generator=gen) * 0.02, torch.randn(20, generator=gen) * 3]).float()


# k = 5 (the slowest programme, ~5 s a row) runs with -m slow; k = 2 to 4 cover the same paths by default.
@pytest.mark.parametrize("k", [2, 3, 4, pytest.param(5, marks=pytest.mark.slow)], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("name", [*binning_rows(), "outliers"], ids=lambda s: s.replace(" ", "-").replace(",", ""))
def test_binned_search_gives_the_same_bits_through_the_dynamic_programme(
    name: str, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no room for the certificate's tables, the pure-torch binned search takes its cuts from the
    dynamic programme: every field is the same as with room (the same cuts, read from the same bins)."""
    from optimum_splitquant import kernels
    from optimum_splitquant.core.kmeans import binned_search

    monkeypatch.setenv(kernels.ENV_VAR, "off")
    x = outlier_row() if name == "outliers" else binning_rows()[name].to(torch.float32)
    searched = kmeans_1d(x, k)
    monkeypatch.setattr(binned_search, "_POSITIONS_PER_CUT", 0)
    via_dp = kmeans_1d(x, k)
    for field in ("centers", "boundaries", "counts", "inertia"):
        assert torch.equal(getattr(via_dp, field), getattr(searched, field)), f"{name}, k={k}: {field} differs"
    exact = kmeans_1d(x.to(torch.float64), k)  # the sorted search, independent of both
    assert torch.equal(via_dp.counts, exact.counts), f"{name}, k={k}: not the partition of the sorted search"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in kB on Linux only")
def test_outlier_row_memory_is_bounded() -> None:
    """The pure-torch search of the outlier row at k = 4 stays within a few hundred MB (it once needed 19 GB)."""
    code = (
        "import resource\n"
        "from optimum_splitquant.core import kmeans_1d\n"
        "from tests.core.test_kmeans import outlier_row\n"
        "x = outlier_row()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "kmeans_1d(x, 4)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    env = {**os.environ, "OPTIMUM_SPLITQUANT_KERNELS": "off", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the search failed: {proc.stderr[-2000:]}"
    extra_mb = int(proc.stdout.split()[-1])
    assert extra_mb < 1024, f"the search took {extra_mb} MB more than the process had before it"
