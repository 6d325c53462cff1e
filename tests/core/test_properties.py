"""Property-based tests (hypothesis) of the pure core: bounds, exact splits, determinism, k = 1."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_splitquant.core import (
    QuantSpec,
    cluster_ids,
    decode_symbols,
    dequantize_weight,
    kmeans_1d,
    quantize_weight,
    split_branches,
)
from tests.helpers import reference_minmax

PROPS = settings(max_examples=40, deadline=None)


@st.composite
def weights(draw):
    """A small 2-D float32 weight with a few outliers, a spec, and a valid group size."""
    out_f = draw(st.integers(1, 9))
    groups = draw(st.integers(1, 3))
    group = draw(st.integers(1, 11))
    in_f = groups * group
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    n_out = draw(st.integers(0, 3))
    for _ in range(n_out):
        r, c = torch.randint(out_f, (1,), generator=gen).item(), torch.randint(in_f, (1,), generator=gen).item()
        w[r, c] *= draw(st.sampled_from([-25.0, 12.0, 80.0]))
    if draw(st.booleans()):  # few distinct values
        w = (w * 2).round() / 2
    spec = QuantSpec(
        bits=draw(st.sampled_from([2, 3, 4, 5, 6, 8])),
        num_clusters=draw(st.integers(1, 5)),
        group_size=group if groups > 1 or draw(st.booleans()) else None,
        clustering=draw(st.sampled_from(["tensor", "channel"])),
        scale_dtype=draw(st.sampled_from([torch.float16, torch.float32])),
    )
    if spec.scale_dtype == torch.float16 and float(w.abs().max()) > 3e4:
        # stacked outliers can leave fp16's range; that refusal has its own test
        spec = dataclasses.replace(spec, scale_dtype=torch.float32)
    return w, spec


def _per_weight(table: torch.Tensor, ids: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    out_f, in_f = ids.shape
    groups = table.shape[1]
    return table.float().gather(-1, ids.view(out_f, groups, -1)).reshape(out_f, in_f)


@PROPS
@given(weights())
def test_error_is_at_most_half_a_step_of_its_cluster(case):
    w, spec = case
    q = quantize_weight(w, spec)
    w_hat = dequantize_weight(q.packed, q.scale, q.offset, q.in_features, spec)
    ids, _ = decode_symbols(q.packed, q.in_features, spec)
    step = _per_weight(q.scale, ids, spec)
    slack = 1e-6 * w.abs().max() + 1e-12
    assert bool(((w_hat - w).abs() <= step / 2 * (1 + 1e-6) + slack).all())


@PROPS
@given(weights())
def test_dequantized_weights_stay_inside_their_clusters_grid(case):
    w, spec = case
    q = quantize_weight(w, spec)
    w_hat = dequantize_weight(q.packed, q.scale, q.offset, q.in_features, spec)
    ids, _ = decode_symbols(q.packed, q.in_features, spec)
    assert torch.equal(ids, cluster_ids(w, spec)), "stored ids are the clustering's ids"
    for j in range(spec.num_clusters):
        member = ids == j
        if not member.any():
            continue
        lo, hi = w[member].min(), w[member].max()
        step = _per_weight(q.scale, ids, spec)[member].max()
        assert w_hat[member].min() >= lo - step / 2 - 1e-6 * abs(lo) - 1e-12
        assert w_hat[member].max() <= hi + step / 2 + 1e-6 * abs(hi) + 1e-12


@PROPS
@given(weights())
def test_branches_sum_exactly_and_are_zero_outside_their_cluster(case):
    w, spec = case
    q = quantize_weight(w, spec)
    w_hat = dequantize_weight(q.packed, q.scale, q.offset, q.in_features, spec)
    ids, _ = decode_symbols(q.packed, q.in_features, spec)
    branches = split_branches(q, spec)
    assert len(branches) == spec.num_clusters
    total = torch.zeros_like(w_hat)
    for j, branch in enumerate(branches):
        assert bool((branch[ids != j] == 0).all())
        total = total + branch
    assert torch.equal(total, w_hat)


@PROPS
@given(weights())
def test_quantization_is_deterministic(case):
    w, spec = case
    a, b = quantize_weight(w, spec), quantize_weight(w.clone(), spec)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset)


@PROPS
@given(weights(), st.integers(0, 2**31 - 1))
def test_clustering_is_invariant_to_the_order_of_values(case, seed):
    w, spec = case
    flat = w.flatten()
    perm = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))
    a = kmeans_1d(flat, spec.num_clusters)
    b = kmeans_1d(flat[perm], spec.num_clusters)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.counts, b.counts)
    assert torch.equal(a.boundaries, b.boundaries)


@PROPS
@given(weights())
def test_one_cluster_is_plain_min_max(case):
    w, spec = case
    plain = QuantSpec(bits=spec.bits, num_clusters=1, group_size=spec.group_size, scale_dtype=spec.scale_dtype)
    q = quantize_weight(w, plain)
    w_hat = dequantize_weight(q.packed, q.scale, q.offset, q.in_features, plain)
    ref_hat, ref_scale, ref_offset = reference_minmax(w, plain.bits, plain.scale_dtype, group_size=plain.group_size)
    assert torch.equal(q.scale.float().squeeze(-1), ref_scale)
    assert torch.equal(q.offset.float().squeeze(-1), ref_offset)
    torch.testing.assert_close(w_hat, ref_hat, rtol=1e-6, atol=1e-7 * float(w.abs().max()) + 1e-12)
