"""The k-means benchmark's code paths on a few tiny tensors (no MiniLM or SmolLM2 loading)."""

from __future__ import annotations

import torch

from benchmarks import bench_kmeans


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(16, 24, generator=gen),
        "b": torch.cat([torch.randn(8, 32, generator=gen), torch.randn(8, 32, generator=gen) + 4.0]),
    }


def test_bench_model_times_both_and_compares_inertia() -> None:
    r = bench_kmeans.bench_model("tiny", _weights(), repeats=1)
    assert r["tensors"] == 2 and r["values"] == 16 * 24 + 16 * 32
    assert set(r["seconds"]) == {"ours", "ours_1thread", "sklearn", "sklearn_1thread"}
    assert all(t > 0 for t in r["seconds"].values())
    # ours is the exact optimum: never worse than scikit-learn's local search beyond rounding
    assert 0.0 < r["worst_inertia_ratio_vs_sklearn"] <= 1.0 + 1e-9
    assert r["worst_tensor"] in {"a", "b"}


def test_bench_quantize_splits_clustering_from_the_rest() -> None:
    q = bench_kmeans.bench_quantize(_weights(), repeats=1)
    assert q["layers"] == 2 and len(q["per_layer"]) == 2
    assert 0.0 < q["clustering_share"] < 5.0  # separate timings: the share is a ratio, not a partition
    assert q["per_layer"][1]["shape"] == [16, 32]
