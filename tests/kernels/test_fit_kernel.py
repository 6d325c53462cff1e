"""The compiled least-squares range fitting gives the same bits as the pure-torch rounds."""

from __future__ import annotations

import itertools

import pytest
import torch

from optimum_splitquant import kernels
from optimum_splitquant.core import QuantSpec
from optimum_splitquant.core import fit as fit_module

pytestmark = pytest.mark.skipif(not kernels.available(), reason="compiled kernels unavailable")

CASES = list(
    itertools.product((1, 2, 3, 4, 16), (2, 3, 8), (torch.float16, torch.bfloat16, torch.float32), (7, 64, 577))
)


def start(spec: QuantSpec, lines: int, width: int, seed: int):
    """Weights with outliers and the min-max start the quantizer gives the rounds (random cluster ids)."""
    gen = torch.Generator().manual_seed(seed)
    k = spec.num_clusters
    w = 0.05 * torch.randn(lines, width, generator=gen)
    w.view(-1)[::11] *= 9
    ids = torch.randint(0, k, (lines, width), generator=gen)
    lo = torch.full((lines, k), torch.inf).scatter_reduce_(1, ids, w, "amin")
    hi = torch.full((lines, k), -torch.inf).scatter_reduce_(1, ids, w, "amax")
    empty = torch.isinf(lo)
    offset, scale = fit_module.stored_range(lo.masked_fill(empty, 0), hi.masked_fill(empty, 0), spec)
    codes = fit_module.grid_codes(w, offset.float().gather(1, ids), scale.float().gather(1, ids), spec)
    return w, ids, codes, offset, scale


def assert_same_fit(native, reference) -> None:
    """``(ids, codes, offset, scale)`` of the two paths are equal, dtypes included."""
    for name, a, b in zip(("ids", "codes", "offset", "scale"), native, reference, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def best_start_both_paths(w: torch.Tensor, ids: torch.Tensor, spec: QuantSpec, monkeypatch: pytest.MonkeyPatch):
    """``_fit_best_start`` of the lines ``w`` from their slots' min-max, compiled and then pure torch."""
    k = spec.num_clusters
    lo = torch.full((w.shape[0], k), torch.inf).scatter_reduce_(1, ids, w, "amin")
    hi = torch.full((w.shape[0], k), -torch.inf).scatter_reduce_(1, ids, w, "amax")
    empty = torch.isinf(lo)
    lo, hi = lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)
    native = fit_module.fit_best_start(w, ids, lo, hi, spec)
    monkeypatch.setattr(kernels, "available", lambda: False)
    return native, fit_module.fit_best_start(w, ids, lo, hi, spec)


@pytest.mark.parametrize("bad", [5, -1])
def test_fit_kernel_refuses_out_of_range_ids(bad: int) -> None:
    spec = QuantSpec(2, 2, fit="mse")
    w, ids, _, offset, scale = start(spec, 3, 8, seed=0)
    ids[0, 0] = bad
    with pytest.raises(RuntimeError, match="ids out of range"):
        kernels.fit_mse_starts(w, ids, offset[None], scale[None], spec.bits, 1, 2)


@pytest.mark.parametrize(("k", "bits", "dtype", "width"), CASES)
def test_best_start_kernel_bit_identical_to_torch(k, bits, dtype, width, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled search over FIT_STARTS (trial rounds, choice by squared error, refit) matches the torch loop."""
    spec = QuantSpec(bits, k, scale_dtype=dtype, fit="mse")
    w, ids, *_ = start(spec, 13, width, seed=k * 10 + bits)
    assert_same_fit(*best_start_both_paths(w, ids, spec, monkeypatch))


@pytest.mark.parametrize("k", [2, 4])
def test_best_start_kernel_bit_identical_with_signed_zeros(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights of +0.0 and -0.0 (the kernel's per-cluster sums add +-0.0 for non-members) fit as in torch."""
    spec = QuantSpec(2, k, fit="mse")
    w, ids, *_ = start(spec, 9, 61, seed=k)
    w.view(-1)[::5] = -0.0
    w.view(-1)[1::7] = 0.0
    w[3] = -0.0  # a whole line of negative zeros
    native, reference = best_start_both_paths(w, ids, spec, monkeypatch)
    assert_same_fit(native, reference)
    for a, b in zip(native[2:], reference[2:], strict=True):  # the ranges' signs too (torch.equal: -0.0 == 0.0)
        assert torch.equal(a.float().signbit(), b.float().signbit())


SAME_BYTES = [
    ((75, 96), QuantSpec(4, 1, 32, fit="mse")),
    ((75, 96), QuantSpec(3, 1, 16, fit="mse", range_bits=6)),
    ((75, 96), QuantSpec(5, 1, 8, scale_dtype=torch.bfloat16, fit="mse")),
    ((75, 96), QuantSpec(2, 4, 48, fit="mse", range_bits=6)),
    ((9, 77), QuantSpec(4, 1, fit="mse", scale_dtype=torch.float32)),
    ((9, 77), QuantSpec(3, 3, fit="mse")),
]


@pytest.mark.parametrize(("shape", "spec"), SAME_BYTES, ids=[f"{s}-{p}" for s, p in SAME_BYTES])
def test_quantize_weight_same_bytes_with_and_without_kernels(shape, spec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole layers (many blocks of lines, ragged lane tails, coded ranges) store the same bytes on both paths."""
    from optimum_splitquant.core import quantize_weight

    gen = torch.Generator().manual_seed(shape[1])
    w = 0.05 * torch.randn(*shape, generator=gen)
    w.view(-1)[::13] *= 8
    native = quantize_weight(w, spec)
    monkeypatch.setattr(kernels, "available", lambda: False)
    reference = quantize_weight(w, spec)
    for name in ("packed", "scale", "offset", "range_codes", "range_steps"):
        a, b = getattr(native, name), getattr(reference, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name


def test_one_range_fit_returns_zero_ids_without_storing_them() -> None:
    """With one cluster the kernel neither reads nor stores ids: they come back as an expanded 0."""
    spec = QuantSpec(4, 1, fit="mse")
    w, ids, _, offset, scale = start(spec, 40, 32, seed=3)
    out_ids, codes, *_ = kernels.fit_mse_starts(w, ids, offset[None], scale[None], spec.bits, 1, 2)
    assert out_ids.shape == w.shape and out_ids.dtype == torch.int64 and not bool(out_ids.any())
    assert out_ids.stride() == (0, 0)
    assert codes.shape == w.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_start_ranges_bit_identical_to_torch(dtype: torch.dtype, bits: int) -> None:
    """The compiled starting grids equal the torch ones: rounding outwards, zero and sign edges included."""
    gen = torch.Generator().manual_seed(bits)
    k = 3
    lo = torch.randn(500, k, generator=gen) * torch.logspace(-9, 2, 500).unsqueeze(1)
    hi = lo + torch.rand(500, k, generator=gen) * torch.logspace(-9, 2, 500).unsqueeze(1)
    lo[:5], hi[:5] = 0.0, 0.0  # empty slots
    lo[5:10] = -hi[5:10].abs()  # ranges across zero
    spec = QuantSpec(bits, k, scale_dtype=dtype, fit="mse")
    kept, spare = (list(t) for t in zip(*fit_module.FIT_STARTS, strict=True))
    native = kernels.start_ranges(lo, hi, kept, spare, bits, dtype)
    reference = fit_module.start_ranges(lo, hi, spec)
    for a, b in zip(native, reference, strict=True):
        assert a.dtype == b.dtype == dtype and a.shape == (len(kept), 500, k)
        assert torch.equal(
            a.view(torch.int16) if a.element_size() == 2 else a.view(torch.int32),
            b.view(torch.int16) if b.element_size() == 2 else b.view(torch.int32),
        )


def test_start_ranges_float16_bit_identical_at_every_half_edge() -> None:
    """The float16 starts (rounded in float arithmetic, not converted) equal torch's on halves, their ties
    and their float neighbours, across subnormals, the normal boundary 2**-14 and up to 65504."""
    halves = torch.arange(0, 0x7C00, 3, dtype=torch.int16).view(torch.float16).float()
    ties = (halves[:-1] + halves[1:]) / 2
    values = torch.cat([halves, ties, torch.nextafter(ties, torch.zeros(())), torch.nextafter(ties, ties * 2)])
    values = values[values <= 30000]  # a range of twice that still fits float16
    lo = torch.cat([-values, values * 0.5, torch.zeros_like(values)]).unsqueeze(1)
    hi = torch.cat([values, values, values]).unsqueeze(1)
    spec = QuantSpec(4, 1, fit="mse")
    kept, spare = (list(t) for t in zip(*fit_module.FIT_STARTS, strict=True))
    native = kernels.start_ranges(lo, hi, kept, spare, spec.bits, torch.float16)
    reference = fit_module.start_ranges(lo, hi, spec)
    for a, b in zip(native, reference, strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_start_ranges_past_the_dtype_raise_on_both_paths() -> None:
    """A range float16 cannot hold: the compiled op refuses, and the quantizer names the remedy."""
    from optimum_splitquant.core import quantize_weight

    lo, hi = torch.tensor([[-1e6]]), torch.tensor([[1e6]])
    with pytest.raises(RuntimeError, match="overflow"):
        kernels.start_ranges(lo, hi, [1.0], [0], 4, torch.float16)
    with pytest.raises(ValueError, match="scale_dtype='float32'"):
        quantize_weight(torch.tensor([[-1e6, 1e6, 0.0, 3.0]]), QuantSpec(4, 1, fit="mse"))


@pytest.mark.parametrize("magnitude", [1e-7, 2e-5, 3e-3, 400.0])
def test_one_range_fit_rounds_float16_ranges_as_torch(magnitude: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 ranges from subnormal to large (the kernel rounds them in its own arithmetic): torch's bits."""
    from optimum_splitquant.core import quantize_weight

    gen = torch.Generator().manual_seed(7)
    w = magnitude * torch.randn(48, 64, generator=gen)
    w.view(-1)[::5] *= torch.rand(w.numel() // 5 + 1, generator=gen)[: w.view(-1)[::5].numel()]
    spec = QuantSpec(3, 1, 16, fit="mse")
    native = quantize_weight(w, spec)
    monkeypatch.setattr(kernels, "available", lambda: False)
    reference = quantize_weight(w, spec)
    assert torch.equal(native.scale.view(torch.int16), reference.scale.view(torch.int16))
    assert torch.equal(native.offset.view(torch.int16), reference.offset.view(torch.int16))
    assert torch.equal(native.packed, reference.packed)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_nearest_levels_kernel_bit_identical_to_torch(k: int, bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled nearest-level search (coded ranges' reassignment) equals the torch one, ties included."""
    gen = torch.Generator().manual_seed(k * 10 + bits)
    spec = QuantSpec(bits, k, fit="mse")
    w = 0.05 * torch.randn(37, 70, generator=gen)
    offset = (0.05 * torch.randn(37, k, generator=gen)).half().float()
    scale = (0.01 * torch.rand(37, k, generator=gen)).half().float()
    scale[::5, 0] = 0.0  # empty slots keep a zero scale
    w[0, :k] = offset[0]  # weights exactly on a level of every cluster: ties go to the lowest id
    native = fit_module.nearest_levels(w, offset, scale, spec)
    monkeypatch.setattr(kernels, "available", lambda: False)
    reference = fit_module.nearest_levels(w, offset, scale, spec)
    for a, b in zip(native, reference, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def line_candidates(w: torch.Tensor, bits: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` float16 ``(scale, offset)`` candidates ``(lines, 1)`` scattered around each line's min-max grid.

    Grids too narrow and too wide (codes clamped at both ends), a whole line of zero scales in every
    candidate, every third line of the second candidate at zero scale, a negative and a -0.0 scale.
    """
    gen = torch.Generator().manual_seed(seed)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    exact = (hi - lo) / ((1 << bits) - 1)
    out = []
    for c in range(count):
        scale = exact * (1 + 0.3 * torch.randn(lo.shape, generator=gen))
        offset = lo + (hi - lo) * 0.2 * torch.randn(lo.shape, generator=gen)
        scale[min(2, len(scale) - 1)] = 0.0
        if c == 1:
            scale[::3] = 0.0
        if c == 2:
            scale[0], scale[-1] = -exact[0], -0.0
        out.append((scale.half(), offset.half()))
    return out


def outlier_lines(lines: int, width: int, seed: int) -> torch.Tensor:
    """:func:`start`'s weights with outliers, and a constant line and an all-zero line among them."""
    w = start(QuantSpec(2, 1), lines, width, seed)[0]
    w[min(3, lines - 1)] = 0.01
    w[min(4, lines - 1)] = 0.0
    return w


def line_errors_both_paths(w, ranges, spec: QuantSpec, monkeypatch: pytest.MonkeyPatch, chunk: int):
    """``_line_errors`` through the compiled op, then through the torch chunks (``chunk`` elements each)."""
    native = fit_module._line_errors(w, ranges, spec)
    with monkeypatch.context() as m:
        m.setattr(kernels, "available", lambda: False)
        m.setattr(fit_module, "_ERROR_CHUNK", chunk)
        reference = fit_module._line_errors(w, ranges, spec)
    return native, reference


@pytest.mark.parametrize("chunk", [1 << 18, 1000], ids=["default-chunk", "many-short-chunks"])
@pytest.mark.parametrize("width", [1, 7, 16, 32, 64, 577])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_line_errors_kernel_bit_identical_to_torch(bits, width, chunk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate's float64 lane sums equal the torch chunks': zero scales, outliers and ragged lanes included."""
    spec = QuantSpec(bits, 1, fit="mse")
    w = outlier_lines(41, width, seed=bits * 1000 + width)
    ranges = line_candidates(w, bits, 5, seed=width)
    offsets = torch.stack([o.float().view(-1) for _, o in ranges])
    scales = torch.stack([s.float().view(-1) for s, _ in ranges])
    direct = kernels.line_errors(w, offsets, scales, bits)
    assert direct.dtype == torch.float64 and direct.shape == (41, 5) and direct.is_contiguous()
    native, reference = line_errors_both_paths(w, ranges, spec, monkeypatch, chunk)
    assert reference.dtype == torch.float64 and reference.shape == (41, 5) and reference.is_contiguous()
    assert torch.equal(direct, native)
    assert torch.equal(native, reference)
    one_at_a_time = torch.cat([fit_module._line_error(w, s, o, spec) for s, o in ranges], 1)
    assert torch.equal(native, one_at_a_time)


@pytest.mark.parametrize(("bits", "group"), [(3, 16), (4, 32), (5, 64)])
def test_line_errors_kernel_bit_identical_on_coded_candidates(bits, group, monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidates fit_coded really scores (fitted, coded and one step away) on a real MiniLM weight."""
    from safetensors import safe_open

    from optimum_splitquant.cli.data import minilm_path
    from optimum_splitquant.core.ranges import code_variants, decode_ranges, encode_ranges

    with safe_open(str(minilm_path() / "model.safetensors"), "pt") as f:
        w = f.get_tensor("encoder.layer.1.attention.output.dense.weight").float().reshape(-1, group)
    spec = QuantSpec(bits, 1, group, fit="mse", range_bits=7, range_block=32)
    _, _, offset, scale = fit_module.fit_best_start(w, fit_module.zero_ids(w), *w.aminmax(dim=1, keepdim=True), spec)
    coded = encode_ranges(scale, offset, spec)
    ranges = [decode_ranges(c, spec) for c in [coded, *code_variants(coded, spec)]]
    native, reference = line_errors_both_paths(w, ranges, spec, monkeypatch, 1 << 18)
    assert native.shape == (w.shape[0], 7)
    assert torch.equal(native, reference)


def _bad(w=None, offsets=None, scales=None, bits=4):
    """Arguments of line_errors: 4 lines of 8 weights, 2 candidates, unless replaced."""
    w = torch.zeros(4, 8) if w is None else w
    offsets = torch.zeros(2, 4) if offsets is None else offsets
    return w, offsets, torch.ones(offsets.shape) if scales is None else scales, bits


BAD_LINE_ERRORS = {
    "w float64": (_bad(w=torch.zeros(4, 8, dtype=torch.float64)), "w must be a float32"),
    "w 1-D": (_bad(w=torch.zeros(8), offsets=torch.zeros(2, 8)), "w must be a float32"),
    "offsets of other lines": (_bad(offsets=torch.zeros(2, 5)), "offsets must be a float32"),
    "offsets float16": (_bad(offsets=torch.zeros(2, 4, dtype=torch.half), scales=torch.ones(2, 4)), "offsets must be"),
    "offsets 3-D": (_bad(offsets=torch.zeros(2, 4, 1)), "offsets must be a float32"),
    "scales of another shape": (_bad(scales=torch.ones(3, 4)), "scales must be a float32"),
    "scales float64": (_bad(scales=torch.ones(2, 4, dtype=torch.float64)), "scales must be a float32"),
    "bits 0": (_bad(bits=0), "bits must be in"),
    "bits 17": (_bad(bits=17), "bits must be in"),
}


@pytest.mark.parametrize("case", BAD_LINE_ERRORS)
def test_line_errors_kernel_refuses_bad_inputs(case: str) -> None:
    """Wrong shapes, dtypes or bits raise RuntimeError naming the argument."""
    args, message = BAD_LINE_ERRORS[case]
    with pytest.raises(RuntimeError, match=message):
        kernels.line_errors(*args)
