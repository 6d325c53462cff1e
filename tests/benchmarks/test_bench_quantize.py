"""The quantizing-speed benchmark's code paths on a few tiny layers (no MiniLM or SmolLM2 loading)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_quantize

pytest.importorskip("hqq")


def test_bench_times_every_budget_against_its_hqq_configs() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(32, 384, generator=gen), torch.randn(64, 384, generator=gen)]
    r = bench_quantize.bench("tiny", weights, repeats=1)
    assert r["layers"] == 2 and r["weights"] == 32 * 384 + 64 * 384
    expected = [(b, f"{n}-bit g{g}") for b, configs in bench_quantize.HQQ_AT_BUDGET.items() for n, g in configs]
    expected.append(("2-bit codes", "4-bit g128"))
    assert [(row["budget"], row["hqq"]) for row in r["rows"]] == expected
    assert r["rows"][-1]["splitquant"] == "INT2 k=4 g192 mse r6"
    for row in r["rows"]:
        assert row["splitquant_s"] > 0 and row["hqq_s"] > 0
        assert row["hqq_over_splitquant"] > 0 and row["splitquant_mweights_per_s"] > 0
    assert r["rows"][0]["splitquant"] == "INT3 k=1 g32 mse r7"
