"""The compiled k-means search (``kernels.kmeans_binned``) against the pure-torch binned search.

Both are exact and share the bins and the finish, so every field of ``kmeans_1d``'s result must be
bit-identical with the kernels on and off. Skipped when the kernels cannot be built here (unless
``OPTIMUM_SPLITQUANT_KERNELS=require``).
"""

from __future__ import annotations

import pytest
import torch

from optimum_splitquant import kernels
from optimum_splitquant.core import KMeans1D, kmeans_1d
from optimum_splitquant.core.kmeans import _sums_before, dp
from tests.core.test_kmeans import binning_rows
from tests.helpers import minilm_linear_weights

FIELDS = ("centers", "boundaries", "counts", "inertia")


@pytest.fixture(scope="module", autouse=True)
def _kernels_built() -> None:
    st = kernels.status()
    if not st.active:
        pytest.skip(f"compiled kernels unavailable: {st.reason}")


def both_paths(
    x: torch.Tensor, k: int, monkeypatch: pytest.MonkeyPatch, may_give_up: bool = False
) -> tuple[KMeans1D, KMeans1D]:
    """``kmeans_1d`` with the kernels on, then off; the compiled search must run unless ``may_give_up``."""
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    if not may_give_up:
        assert kernels.kmeans_binned(x.float().contiguous(), k) is not None, "the compiled search gave up"
    native = kmeans_1d(x, k)
    monkeypatch.setenv(kernels.ENV_VAR, "off")
    assert kernels.kmeans_binned(x.float().contiguous(), k) is None
    torch_path = kmeans_1d(x, k)
    return native, torch_path


def assert_identical(a: KMeans1D, b: KMeans1D, what: str) -> None:
    for field in FIELDS:
        assert torch.equal(getattr(a, field), getattr(b, field)), f"{what}: {field} differs"


@pytest.mark.parametrize("k", [3, pytest.param(4, marks=pytest.mark.slow)], ids=lambda k: f"k{k}")
def test_real_minilm_weights_bit_identical(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every MiniLM linear weight: the same centres, boundaries, counts and inertia, bit for bit."""
    for name, w in minilm_linear_weights().items():
        native, torch_path = both_paths(w.flatten(), k, monkeypatch)
        assert_identical(native, torch_path, name)


def odd_rows() -> dict[str, torch.Tensor]:
    """The binning tests' odd value ranges, plus many ties and a few outliers."""
    gen = torch.Generator().manual_seed(7)
    n = 40_000
    return {
        **binning_rows(),
        # few distinct values, each repeated (as weights dequantized from a 4-bit format): many ties
        "16 levels": torch.randint(-8, 8, (n,), generator=gen).float() * 0.01,
        "outliers": torch.cat([torch.randn(n - 20, generator=gen) * 0.02, torch.randn(20, generator=gen) * 3]),
    }


ODD_CASES = [(name, k) for name in odd_rows() for k in (2, 3, 4, 5)]


@pytest.mark.parametrize(
    ("name", "k"), ODD_CASES, ids=lambda v: f"k{v}" if isinstance(v, int) else v.replace(" ", "-").replace(",", "")
)
def test_odd_rows_bit_identical(name: str, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # a few far outliers: the bound cannot prune, and both searches may hand over to the dynamic programme
    native, torch_path = both_paths(odd_rows()[name].float(), k, monkeypatch, may_give_up=name == "outliers")
    assert_identical(native, torch_path, name)


def test_out_of_range_k_is_refused() -> None:
    x = torch.randn(1 << 15, generator=torch.Generator().manual_seed(2))
    with pytest.raises(RuntimeError, match="2 <= k <= 9"):
        torch.ops.optimum_splitquant.kmeans_binned.default(x, 10)


@pytest.mark.parametrize("k", [6, 9], ids=lambda k: f"k{k}")
def test_large_row_many_clusters_bit_identical(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Binned rows of 2^18 values or more keep the binned search up to k = 9: compiled and torch agree."""
    w = next(t for t in minilm_linear_weights().values() if t.numel() >= 1 << 18)
    native, torch_path = both_paths(w.flatten(), k, monkeypatch)
    assert_identical(native, torch_path, f"{tuple(w.shape)} weight")


@pytest.mark.parametrize("k", [2, 3, 7, 16], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("name", ["normal", "ties", "constant", "heavy tails", "one value"])
def test_dynamic_programme_layers_same_cuts(name: str, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled layers of the dynamic programme pick the same cuts as the torch layers, ties included."""
    gen = torch.Generator().manual_seed(4)
    rows = {
        "normal": torch.randn(3, 2000, generator=gen, dtype=torch.float64),
        "ties": torch.randint(-5, 5, (4, 999), generator=gen).double(),
        "constant": torch.ones(2, 50, dtype=torch.float64),
        "heavy tails": torch.randn(2, 3000, generator=gen, dtype=torch.float64) ** 5,
        "one value": torch.randn(1, 1, generator=gen, dtype=torch.float64),
    }
    s = torch.sort(rows[name], 1).values
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    compiled = dp._dc_cuts(s, k)
    monkeypatch.setenv(kernels.ENV_VAR, "off")
    assert torch.equal(compiled, dp._dc_cuts(s, k)), f"{name}, k={k}: the cuts differ"


@pytest.mark.parametrize("k", [10, pytest.param(16, marks=pytest.mark.slow)], ids=lambda k: f"k{k}")  # 16: -m slow
def test_many_clusters_on_a_real_weight_bit_identical(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per tensor and per row (the dynamic programme): every field the same with the kernels on and off."""
    w = next(t for t in minilm_linear_weights().values() if t.numel() >= 1 << 18)
    for what, x in (("per tensor", w.flatten()[: 1 << 16]), ("per row", w[:64])):
        monkeypatch.setenv(kernels.ENV_VAR, "auto")
        native = kmeans_1d(x, k)
        monkeypatch.setenv(kernels.ENV_VAR, "off")
        assert_identical(native, kmeans_1d(x, k), f"{what}, k={k}")


def test_sums_before_are_exact() -> None:
    """Partial sums inside a bin (one sign, one binade) are exact: equal to math.fsum of the values."""
    import math

    gen = torch.Generator().manual_seed(3)
    # two "bins": [1, 2) and [-0.5, -0.25), distinct sorted values with counts
    a = torch.unique(1 + torch.rand(300, generator=gen))
    b = torch.unique(-0.5 + torch.rand(300, generator=gen) * 0.25)
    uv = torch.cat([b, a]).float()
    uv = torch.unique(uv)
    ucnt = torch.randint(1, 1000, uv.shape, generator=gen)
    first_pos = int((uv > 0).nonzero()[0])
    start = torch.where(torch.arange(uv.numel()) < first_pos, 0, first_pos)
    got = _sums_before(uv, ucnt, start)
    for i in range(uv.numel()):
        s = int(start[i])
        want = math.fsum(float(uv[j]) * int(ucnt[j]) for j in range(s, i))
        assert float(got[i]) == want, i
