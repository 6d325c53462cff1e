"""The coded-range fit: every candidate's line errors in one batched pass, the same bits as one at a time."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from optimum_splitquant import kernels
from optimum_splitquant.cli.data import minilm_path
from optimum_splitquant.core import QuantSpec, fit
from optimum_splitquant.core.ranges import CodedRanges, code_variants, decode_ranges, encode_ranges

# The bits and range groups of the for_budget configurations (one cluster, coded ranges, format 3).
SETTINGS = [(3, 32), (3, 16), (4, 64), (4, 32), (4, 16), (5, 16)]


def _spec(bits: int, group: int) -> QuantSpec:
    return QuantSpec(bits=bits, num_clusters=1, group_size=group, fit="mse", range_bits=6, range_block=16)


def _random_lines(group: int) -> torch.Tensor:
    """Gaussian lines with a constant line (a zero scale) and an all-zero line among them."""
    g = torch.Generator().manual_seed(group)
    w = torch.randn(24 * 40, group, generator=g) * 0.02
    w[5] = 0.01
    w[17] = 0.0
    return w


def _minilm_lines(group: int) -> torch.Tensor:
    """Lines of a real MiniLM weight (the shipped all-MiniLM-L6-v2)."""
    with safe_open(str(minilm_path() / "model.safetensors"), "pt") as f:
        return f.get_tensor("encoder.layer.0.attention.self.query.weight").float().reshape(-1, group)


def _fitted(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    _, _, offset, scale = fit.fit_best_start(w, fit.zero_ids(w), lo, hi, spec)
    return offset, scale


def _candidates(w: torch.Tensor, spec: QuantSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    coded = encode_ranges(*reversed(_fitted(w, spec)), spec)
    return [decode_ranges(c, spec) for c in [coded, *code_variants(coded, spec)]]


def _fit_coded_one_at_a_time(w: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, spec: QuantSpec):
    """The coded fit with each candidate's errors computed on its own (the reference)."""
    coded = encode_ranges(scale, offset, spec)
    candidates = [coded, *code_variants(coded, spec)]
    errors = torch.cat([fit._line_error(w, *decode_ranges(c, spec), spec) for c in candidates], 1)
    best = errors.argmin(1, keepdim=True)
    scale_codes = torch.stack([c.scale_codes for c in candidates], 1).gather(1, best.unsqueeze(2))[:, 0]
    offset_codes = torch.stack([c.offset_codes for c in candidates], 1).gather(1, best.unsqueeze(2))[:, 0]
    coded = CodedRanges(scale_codes, offset_codes, coded.steps)
    scale, offset = decode_ranges(coded, spec)
    ids, codes = fit.nearest_levels(w, offset.float(), scale.float(), spec)
    return ids, codes, offset, scale, coded


@pytest.mark.parametrize("chunk", [1 << 18, 1000], ids=["default-chunk", "many-short-chunks"])
@pytest.mark.parametrize(("bits", "group"), SETTINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("source", ["random", "minilm"])
def test_candidate_errors_match_one_candidate_at_a_time(monkeypatch, source, bits, group, chunk) -> None:
    if chunk < fit._ERROR_CHUNK:  # chunks are the torch path's: without the compiled line_errors
        monkeypatch.setattr(kernels, "line_errors", lambda *args: None)
    monkeypatch.setattr(fit, "_ERROR_CHUNK", chunk)  # 1000: several chunks of a few lines, the last one short
    spec = _spec(bits, group)
    w = _random_lines(group) if source == "random" else _minilm_lines(group)
    ranges = _candidates(w, spec)
    ranges[0][0][:3] = 0.0  # zero scales: every code of those lines levels at the offset
    expected = torch.cat([fit._line_error(w, scale, offset, spec) for scale, offset in ranges], 1)
    got = fit._line_errors(w, ranges, spec)
    assert got.shape == (w.shape[0], 7) and got.dtype == torch.float64 and got.is_contiguous()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kernels_on", [True, False], ids=["kernels", "torch"])
def test_candidate_errors_match_without_the_compiled_kernels(monkeypatch, kernels_on: bool) -> None:
    if not kernels_on:
        monkeypatch.setattr(kernels, "available", lambda: False)
    spec = _spec(3, 32)
    w = _random_lines(32)
    ranges = _candidates(w, spec)
    expected = torch.cat([fit._line_error(w, scale, offset, spec) for scale, offset in ranges], 1)
    assert torch.equal(fit._line_errors(w, ranges, spec), expected)


@pytest.mark.parametrize(("bits", "group"), SETTINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("source", ["random", "minilm"])
def test_fit_coded_same_bits_as_the_one_at_a_time_reference(source: str, bits: int, group: int) -> None:
    spec = _spec(bits, group)
    w = _random_lines(group) if source == "random" else _minilm_lines(group)
    offset, scale = _fitted(w, spec)
    got = fit.fit_coded(w, offset, scale, spec)
    expected = _fit_coded_one_at_a_time(w, offset, scale, spec)
    for a, b in zip(got[:4], expected[:4], strict=True):
        assert torch.equal(a, b)
    for name in ("scale_codes", "offset_codes", "steps"):
        assert torch.equal(getattr(got[4], name), getattr(expected[4], name))


def test_fit_coded_searches_nearest_levels_once(monkeypatch) -> None:
    """The candidates' codes come from the batched pass: only the chosen ranges get a nearest-level search."""
    if not kernels.available():
        pytest.skip("counts calls of the compiled nearest_levels")
    calls = []
    original = kernels.nearest_levels
    monkeypatch.setattr(kernels, "nearest_levels", lambda *a: calls.append(1) or original(*a))
    spec = _spec(4, 32)
    w = _random_lines(32)
    offset, scale = _fitted(w, spec)
    fit.fit_coded(w, offset, scale, spec)
    assert len(calls) == 1


def test_candidate_errors_with_several_clusters_fall_back_per_candidate() -> None:
    spec = QuantSpec(bits=3, num_clusters=2, group_size=32, fit="mse", range_bits=6, range_block=16)
    w = _random_lines(32)
    lo = torch.stack([w.amin(1), w.median(1).values], 1)
    hi = torch.stack([w.median(1).values, w.amax(1)], 1)
    ids = (w > w.median(1, keepdim=True).values).long()
    _, _, offset, scale = fit.fit_best_start(w, ids, lo, hi, spec)
    ranges = [(scale, offset), (scale * 2, offset)]
    expected = torch.cat([fit._line_error(w, s, o, spec) for s, o in ranges], 1)
    assert torch.equal(fit._line_errors(w, ranges, spec), expected)
