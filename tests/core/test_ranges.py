"""Coded ranges (formats 2 and 3): encoding, decoding, packing, quantizing with them, settings and their size."""

from __future__ import annotations

import math

import pytest
import torch

import optimum_splitquant.core.quantize as quantize_module
from optimum_splitquant.core import QuantSpec, dequantize_weight, packed_row_bytes, quantize_weight, unpack_rows
from optimum_splitquant.core.ranges import (
    CodedRanges,
    code_variants,
    decode_layer_ranges,
    decode_ranges,
    encode_ranges,
    offset_zero,
    pack_range_codes,
    range_codes_bytes,
    unpack_range_codes,
)
from optimum_splitquant.core.spec import MAX_RANGE_BLOCK
from tests.helpers import sqnr_db

RANGE_BITS = (4, 5, 6, 7, 8)
BLOCKS = (1, 3, 8)
CLUSTERS = (1, 2, 4)
LINES = 22  # 22 % 3 == 1 and 22 % 8 == 6: blocks 3 and 8 end with a short block
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _rounding(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest error of rounding the float32 values ``x`` to ``dtype`` (half an ulp, subnormals included)."""
    info = torch.finfo(dtype)
    return info.eps / 2 * x.abs() + info.smallest_normal * info.eps


def _random_ranges(lines: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales ``>= 0`` (with exact zeros and tiny ones beside large ones) and offsets of both signs."""
    gen = torch.Generator().manual_seed(seed)
    scale = 0.05 * torch.rand(lines, k, generator=gen)
    pick = torch.rand(lines, k, generator=gen)
    scale = torch.where(pick < 0.1, torch.zeros_like(scale), scale)
    scale = torch.where((pick >= 0.1) & (pick < 0.2), torch.full_like(scale, 1e-4), scale)  # below half a step
    offset = 0.1 * torch.randn(lines, k, generator=gen) - 0.02  # mostly negative, some positive
    offset = torch.where(torch.rand(lines, k, generator=gen) < 0.05, torch.zeros_like(offset), offset)
    return scale, offset


def _per_line(steps: torch.Tensor, lines: int, block: int) -> torch.Tensor:
    """float32 steps ``(lines, 2, k)`` of each line: line ``i`` belongs to block ``i // block``."""
    return steps.float()[torch.arange(lines) // block]


@pytest.mark.parametrize("signed", [True, False], ids=["format3", "format2"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("range_bits", RANGE_BITS)
@pytest.mark.parametrize("k", CLUSTERS)
def test_encode_decode_round_trip(k, range_bits, block, dtype, signed):
    spec = QuantSpec(
        bits=4,
        num_clusters=k,
        fit="mse",
        scale_dtype=dtype,
        range_bits=range_bits,
        range_block=block,
        signed_offsets=signed,
    )
    scale, offset = _random_ranges(LINES, k, seed=range_bits * 100 + block * 10 + k)
    top = (1 << range_bits) - 1
    zero = (1 << (range_bits - 1)) if signed else 0
    assert offset_zero(spec) == zero
    blocks = -(-LINES // block)

    coded = encode_ranges(scale.to(dtype), offset.to(dtype), spec)
    scale, offset = scale.to(dtype).float(), offset.to(dtype).float()  # what was encoded
    assert coded.scale_codes.shape == coded.offset_codes.shape == (LINES, k)
    assert coded.steps.shape == (blocks, 2, k) and coded.steps.dtype == dtype
    for codes in (coded.scale_codes, coded.offset_codes):
        assert int(codes.min()) >= 0 and int(codes.max()) <= top

    dec_scale, dec_offset = decode_ranges(coded, spec)
    assert dec_scale.dtype == dec_offset.dtype == dtype
    assert dec_scale.shape == dec_offset.shape == (LINES, k)
    steps = _per_line(coded.steps, LINES, block)
    scale_step, offset_step = steps[:, 0], steps[:, 1]
    assert torch.equal(dec_scale, (coded.scale_codes.float() * scale_step).to(dtype))
    assert torch.equal(dec_offset, ((coded.offset_codes.float() - zero) * offset_step).to(dtype))
    dec_scale, dec_offset = dec_scale.float(), dec_offset.float()

    # Steps cover their block: the largest scale and the largest-magnitude offset are within top codes.
    assert bool((scale_step >= 0).all())
    padded = torch.zeros(blocks * block, k)
    padded[:LINES] = scale
    block_max = padded.view(blocks, block, k).amax(1)
    assert bool((top * coded.steps[:, 0].float() >= block_max).all())
    if signed:
        assert bool((offset_step >= 0).all())
        for side, codes in ((offset.clamp(min=0), top - zero), (-offset.clamp(max=0), zero)):
            padded[:LINES] = side
            assert bool((codes * coded.steps[:, 1].float() >= padded.view(blocks, block, k).amax(1)).all())
    else:
        padded[:LINES] = offset.abs()
        assert bool((top * coded.steps[:, 1].float().abs() >= padded.view(blocks, block, k).amax(1)).all())

    # Each block's largest scale is reproduced within one step.
    padded[:LINES] = scale
    where_max = padded.view(blocks, block, k).argmax(1) + torch.arange(blocks).unsqueeze(1) * block  # (blocks, k)
    largest = scale.gather(0, where_max)
    rebuilt = dec_scale.gather(0, where_max)
    step = coded.steps[:, 0].float()
    assert bool(((rebuilt - largest).abs() <= step + _rounding(largest, dtype)).all())

    # Non-zero scales never decode to 0; zero scales decode to 0.
    assert bool((dec_scale[scale > 0] > 0).all())
    assert bool((dec_scale[scale == 0] == 0).all())

    # Format 3: every offset within half a step. Format 2: offsets on the side of their block's step
    # within half a step, the other side stored as 0.
    same = (offset * offset_step >= 0) & (offset_step != 0) if not signed else offset_step > 0
    tol = offset_step.abs() / 2 * (1 + 1e-6) + _rounding(offset, dtype)
    assert bool(((dec_offset - offset).abs() <= tol)[same].all())
    if not signed:
        opposite = offset * offset_step < 0
        assert bool((dec_offset[opposite] == 0).all())
    zero_step = offset_step == 0
    assert bool((dec_offset[zero_step] == 0).all())


@pytest.mark.parametrize("range_bits", [4, 6, 8])
def test_code_variants_move_each_code_one_step(range_bits):
    spec = QuantSpec(bits=4, num_clusters=2, fit="mse", range_bits=range_bits, range_block=3)
    top = (1 << range_bits) - 1
    scale_codes = torch.tensor([[0, 1], [2, top], [top - 1, 5]], dtype=torch.uint8)
    offset_codes = torch.tensor([[0, 1], [top, 7], [3, top - 1]], dtype=torch.uint8)
    steps = torch.ones(1, 2, 2, dtype=torch.float16)
    variants = code_variants(CodedRanges(scale_codes, offset_codes, steps), spec)
    s, o = scale_codes.long(), offset_codes.long()
    down, up = (o - 1).clamp(min=0), (o + 1).clamp(max=top)
    wider = torch.where(s > 0, (s + 1).clamp(max=top), 0)
    narrower = torch.where(s > 0, (s - 1).clamp(min=1), 0)  # a non-zero scale stays non-zero
    want = [(s, down), (s, up), (wider, o), (narrower, o), (wider, down), (narrower, up)]
    assert len(variants) == len(want)
    for variant, (ws, wo) in zip(variants, want, strict=True):
        assert variant.steps is steps
        assert torch.equal(variant.scale_codes.long(), ws) and torch.equal(variant.offset_codes.long(), wo)
    with pytest.raises(ValueError, match="format 3"):
        code_variants(
            CodedRanges(scale_codes, offset_codes, steps), QuantSpec(**{**_spec_args(spec), "signed_offsets": False})
        )


def _spec_args(spec: QuantSpec) -> dict:
    return {name: getattr(spec, name) for name in spec.__dataclass_fields__}


def test_round_trip_inputs_reach_every_case():
    """The random ranges above do hit the cases the round trip checks (tiny scales, opposite-sign offsets)."""
    spec = QuantSpec(bits=4, num_clusters=2, fit="mse", range_bits=4, range_block=8)
    scale, offset = _random_ranges(LINES, 2, seed=4 * 100 + 8 * 10 + 2)
    coded = encode_ranges(scale.half(), offset.half(), spec)
    step = _per_line(coded.steps, LINES, 8)
    assert bool(((scale > 0) & (scale < step[:, 0] / 2)).any()), "no scale below half a step"
    assert bool((offset > 0).any()) and bool((offset < 0).any()), "offsets of one sign only"
    old = encode_ranges(scale.half(), offset.half(), QuantSpec(**{**_spec_args(spec), "signed_offsets": False}))
    assert bool((offset * _per_line(old.steps, LINES, 8)[:, 1] < 0).any()), "no offset of the opposite sign"


@pytest.mark.parametrize("range_bits", RANGE_BITS)
@pytest.mark.parametrize("k", CLUSTERS)
@pytest.mark.parametrize("lines", [1, 7, 22])
def test_pack_unpack_round_trip(lines, k, range_bits):
    spec = QuantSpec(bits=4, num_clusters=k, fit="mse", range_bits=range_bits, range_block=3)
    gen = torch.Generator().manual_seed(lines * 1000 + k * 10 + range_bits)
    top = (1 << range_bits) - 1
    scale_codes = torch.randint(0, top + 1, (lines, k), generator=gen).to(torch.uint8)
    offset_codes = torch.randint(0, top + 1, (lines, k), generator=gen).to(torch.uint8)
    scale_codes[0, 0], offset_codes[-1, -1] = top, top  # the widest code is kept whole
    steps = torch.randn(-(-lines // 3), 2, k, generator=gen).half()
    coded = CodedRanges(scale_codes, offset_codes, steps)

    packed = pack_range_codes(coded, spec)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == range_codes_bytes(lines, k, range_bits)
    assert packed.numel() == math.ceil(2 * lines * k / 8) * range_bits  # the documented stored shape
    # Stored order: every scale code in (line, cluster) order, then every offset code.
    symbols = unpack_rows(packed.reshape(1, -1), range_bits, 2 * lines * k).reshape(-1)
    assert torch.equal(symbols, torch.cat([scale_codes.reshape(-1), offset_codes.reshape(-1)]).to(symbols.dtype))

    back = unpack_range_codes(packed, steps, lines, spec)
    assert torch.equal(back.scale_codes, scale_codes)
    assert torch.equal(back.offset_codes, offset_codes)
    assert back.steps is steps


def _weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn(out_f, in_f, generator=gen)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, num_clusters=1, group_size=32, fit="mse", range_bits=6, range_block=5),
        QuantSpec(bits=3, num_clusters=3, group_size=32, fit="mse", range_bits=4, range_block=8),
        QuantSpec(bits=2, num_clusters=4, fit="mse", clustering="channel", range_bits=8, range_block=3),
        QuantSpec(bits=4, num_clusters=2, group_size=16, fit="mse", scale_dtype=torch.bfloat16, range_bits=5),
    ],
    ids=["b4k1g32r6B5", "b3k3g32r4B8", "b2k4rowr8B3-channel", "b4k2g16r5-bf16"],
)
def test_quantize_weight_stores_the_decoded_ranges(spec):
    w = _weight(21, 96, seed=1)
    out_f, in_f = w.shape
    groups, k = spec.num_groups(in_f), spec.num_clusters
    lines = out_f * groups
    q = quantize_weight(w, spec)

    assert q.range_codes is not None and q.range_steps is not None
    assert q.range_codes.dtype == torch.uint8
    assert tuple(q.range_codes.shape) == (range_codes_bytes(lines, k, spec.range_bits),)
    assert tuple(q.range_steps.shape) == (-(-lines // spec.range_block), 2, k)
    assert q.range_steps.dtype == spec.scale_dtype
    assert q.packed.shape == (out_f, packed_row_bytes(in_f, spec.symbol_width))

    coded = unpack_range_codes(q.range_codes, q.range_steps, lines, spec)
    scale, offset = decode_ranges(coded, spec)
    assert q.scale.dtype == q.offset.dtype == spec.scale_dtype
    assert torch.equal(q.scale, scale.view(out_f, groups, k))
    assert torch.equal(q.offset, offset.view(out_f, groups, k))
    w_hat = dequantize_weight(q.packed, q.scale, q.offset, in_f, spec)
    assert bool(torch.isfinite(w_hat).all())
    assert sqnr_db(w, w_hat) > 6.0 * spec.bits - 6.0  # a working quantizer, not noise (~6 dB per bit)


def test_coded_ranges_cost_little_accuracy():
    w = _weight(96, 256, seed=2)
    plain = QuantSpec(bits=4, num_clusters=1, group_size=64, fit="mse")
    coded = QuantSpec(bits=4, num_clusters=1, group_size=64, fit="mse", range_bits=6)
    sqnr = {}
    for name, spec in (("plain", plain), ("coded", coded)):
        q = quantize_weight(w, spec)
        sqnr[name] = sqnr_db(w, dequantize_weight(q.packed, q.scale, q.offset, q.in_features, spec))
    assert abs(sqnr["plain"] - sqnr["coded"]) <= 0.5, sqnr


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, num_clusters=1, group_size=64, fit="mse", range_bits=6, range_block=8),
        QuantSpec(bits=4, num_clusters=1, group_size=64, fit="mse", range_bits=6, range_block=3),
        QuantSpec(bits=3, num_clusters=3, group_size=32, fit="mse", range_bits=5, range_block=5),
        QuantSpec(bits=2, num_clusters=2, fit="mse", clustering="channel", range_bits=7, range_block=4),
    ],
    ids=["g64B8", "g64B3", "k3g32B5", "k2rowB4-channel"],
)
def test_quantize_weight_does_not_depend_on_chunking(spec, monkeypatch):
    w = _weight(50, 256, seed=3)  # 50 rows: the chunks of 3 rows (rounded to whole blocks) end short
    whole = quantize_weight(w, spec)
    monkeypatch.setattr(quantize_module, "_CHUNK_WEIGHTS", 256 * 3)
    chunked = quantize_weight(w, spec)
    for name in ("packed", "range_codes", "range_steps", "scale", "offset"):
        a, b = getattr(whole, name), getattr(chunked, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), name


@pytest.mark.parametrize(
    ("range_bits", "error"),
    [(3, ValueError), (9, ValueError), (0, ValueError), (True, TypeError), ("6", TypeError), (6.0, TypeError)],
)
def test_spec_rejects_bad_range_bits(range_bits, error):
    with pytest.raises(error, match="range_bits"):
        QuantSpec(bits=4, num_clusters=1, fit="mse", range_bits=range_bits)


def test_spec_range_bits_needs_mse_fit():
    with pytest.raises(ValueError, match="fit='mse'"):
        QuantSpec(bits=4, num_clusters=1, fit="minmax", range_bits=6)


@pytest.mark.parametrize("range_bits", [None, 6])
@pytest.mark.parametrize(
    ("range_block", "error"), [(0, ValueError), (-1, ValueError), (True, TypeError), (2.0, TypeError)]
)
def test_spec_rejects_bad_range_block(range_block, error, range_bits):
    with pytest.raises(error, match="range_block"):
        QuantSpec(bits=4, num_clusters=1, fit="mse", range_bits=range_bits, range_block=range_block)


@pytest.mark.parametrize("range_bits", RANGE_BITS)
def test_spec_accepts_every_range_bits(range_bits):
    spec = QuantSpec(bits=4, num_clusters=1, fit="mse", range_bits=range_bits, range_block=1)
    assert spec.range_bits == range_bits and spec.range_block == 1


def test_bits_per_weight_counts_coded_side_data():
    spec = QuantSpec(bits=4, num_clusters=1, group_size=64, fit="mse", range_bits=6)
    # 4 code bits + per 64 weights two 6-bit codes and two fp16 steps shared by 8 lines.
    assert spec.bits_per_weight(512) == 4.25
    spec = QuantSpec(bits=2, num_clusters=4, group_size=None, fit="mse", range_bits=6)
    # symbol 2 + 2 id bits; one line per row of 576: 2 * 4 clusters * (6 + 16 / 8) bits.
    assert math.isclose(spec.bits_per_weight(576), 4 + 2 * 4 * (6 + 16 / 8) / 576, rel_tol=1e-12)
    plain = QuantSpec(bits=4, num_clusters=1, group_size=64, fit="mse")
    assert plain.bits_per_weight(512) == 4.5  # two fp16 values per group of 64


# Rows that share a block with very different ranges (format 3). Format 1 (the same settings with fp16
# ranges) is the yardstick: coded ranges cost some accuracy, never a whole row or its block.
FORMAT3 = QuantSpec(bits=4, num_clusters=1, group_size=32, fit="mse", range_bits=6, range_block=8)
FORMAT1 = QuantSpec(bits=4, num_clusters=1, group_size=32, fit="mse")


def _round_trip(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    q = quantize_weight(w, spec)
    return dequantize_weight(q.packed, q.scale, q.offset, q.in_features, spec)


def test_constant_row_round_trips():
    w = _weight(64, 64, seed=5)
    w[5] = 0.123  # a constant row among rows of negative minima: its block holds rows 4-7
    coded, plain = ((_round_trip(w, spec) - w).abs() for spec in (FORMAT3, FORMAT1))
    assert float(coded[5].max()) <= 2e-3  # an offset code step of this block; format 1: fp16 rounding
    assert float(coded[[4, 6, 7]].max()) <= 1.5 * float(plain[[4, 6, 7]].max())


def test_one_signed_row_spares_its_block():
    w = _weight(64, 64, seed=6)
    w[0] = w[0].abs() + 1  # all positive: rows 1-3 share its blocks (two lines a row, 8 lines a block)
    coded, plain = ((_round_trip(w, spec) - w).abs() for spec in (FORMAT3, FORMAT1))
    assert float(coded[1:4].max()) <= 2.5 * float(plain[1:4].max())
    assert float(coded[0].max()) <= 2.5 * float(plain[0].max())
    assert float(coded[4:].max()) <= 1.5 * float(plain[4:].max())


@pytest.mark.parametrize("outlier", [100.0, -100.0])
def test_one_outlier_does_not_ruin_its_block(outlier):
    w = _weight(64, 64, seed=7)
    w[0, 3] = outlier * 0.05  # 100 standard deviations, in line 0 of block 0 (rows 0-3)
    coded, plain = ((_round_trip(w, spec) - w) for spec in (FORMAT3, FORMAT1))
    rms = lambda e: float(torch.cat([e[0, 32:], e[1:4].reshape(-1)]).square().mean().sqrt())  # noqa: E731
    assert rms(coded) <= 3.0 * rms(plain)  # the other seven lines of the block
    assert float(coded[0, 3].abs()) <= 2.0 * float(plain[0, :32].abs().max())  # the outlier itself is kept


def test_range_block_longer_than_the_lines_is_one_block():
    w = _weight(12, 64, seed=8)  # 24 lines of 32
    one_block = QuantSpec(bits=4, num_clusters=1, group_size=32, fit="mse", range_bits=6, range_block=24)
    q = quantize_weight(w, one_block)
    for block in (25, 1000, MAX_RANGE_BLOCK):
        longer = quantize_weight(w, QuantSpec(**{**_spec_args(one_block), "range_block": block}))
        assert longer.range_steps.shape == (1, 2, 1)
        for name in ("packed", "range_codes", "range_steps", "scale", "offset"):
            assert torch.equal(getattr(longer, name), getattr(q, name)), (block, name)


@pytest.mark.parametrize("range_block", [MAX_RANGE_BLOCK + 1, 10**12])
def test_spec_rejects_huge_range_block(range_block):
    with pytest.raises(ValueError, match=rf"range_block must be an integer in \[1, {MAX_RANGE_BLOCK}\]"):
        QuantSpec(bits=4, num_clusters=1, fit="mse", range_bits=6, range_block=range_block)


@pytest.mark.parametrize("kernels_mode", ["auto", "off"])
@pytest.mark.parametrize("signed", [True, False], ids=["format3", "format2"])
@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float32], ids=[*DTYPES, "fp32"])
def test_decode_layer_ranges_matches_the_format(dtype, signed, kernels_mode, monkeypatch):
    """A layer's ranges, compiled or pure torch: each code times its block's step in float32, rounded to the dtype."""
    monkeypatch.setenv("OPTIMUM_SPLITQUANT_KERNELS", kernels_mode)
    rows, groups, k, r, block = 13, 5, 3, 6, 8
    spec = QuantSpec(4, k, fit="mse", range_bits=r, range_block=block, scale_dtype=dtype, signed_offsets=signed)
    gen = torch.Generator().manual_seed(11)
    lines = rows * groups
    codes = torch.randint(0, 256, (range_codes_bytes(lines, k, r),), generator=gen, dtype=torch.uint8)
    steps = (torch.randn(-(-lines // block), 2, k, generator=gen) * 1e-3).to(dtype)
    scale, offset = decode_layer_ranges(codes, steps, rows, groups, spec)
    symbols = unpack_rows(codes.view(1, -1), r, 2 * lines * k).view(2, lines, k).float()
    per_line = steps.float()[torch.arange(lines) // block]  # (lines, 2, k)
    zero = offset_zero(spec)
    expected_scale = (symbols[0] * per_line[:, 0]).to(dtype).view(rows, groups, k)
    expected_offset = ((symbols[1] - zero) * per_line[:, 1]).to(dtype).view(rows, groups, k)
    assert torch.equal(scale, expected_scale) and torch.equal(offset, expected_offset)
    assert scale.dtype == dtype and scale.shape == (rows, groups, k)
