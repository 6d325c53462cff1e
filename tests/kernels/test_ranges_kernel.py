"""The compiled decode of coded ranges gives the bits of the pure-torch unpack and decode."""

from __future__ import annotations

import pytest
import torch

from optimum_splitquant import kernels
from optimum_splitquant.core import QuantSpec
from optimum_splitquant.core.ranges import decode_layer_ranges, decode_ranges, range_codes_bytes, unpack_range_codes

compiled = pytest.mark.skipif(not kernels.available(), reason="compiled kernels unavailable")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BLOCKS = (1, 8, 16, 1 << 16)  # 1 << 16: one block of all the lines


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so -0.0, subnormals and infinities compare exactly)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def random_stored(lines: int, spec: QuantSpec, seed: int, steps_dtype: torch.dtype | None = None):
    """Random packed codes (every bit pattern) and steps over many magnitudes, zeros and signs included.

    fp16 steps reach the subnormals (products that round there, ties included) and values whose
    products overflow to infinity; offset steps are negative in format 2.
    """
    gen = torch.Generator().manual_seed(seed)
    k, block = spec.num_clusters, spec.range_block
    codes = torch.randint(0, 256, (range_codes_bytes(lines, k, spec.range_bits),), generator=gen, dtype=torch.uint8)
    blocks = -(-lines // block)
    low, high = {torch.float16: (-26, 17), torch.bfloat16: (-130, 120), torch.float32: (-140, 120)}[spec.scale_dtype]
    exponent = torch.randint(low, high, (blocks, 2, k), generator=gen).float()
    steps = torch.rand(blocks, 2, k, generator=gen) * torch.exp2(exponent)
    steps = steps.clamp(max=0.9 * torch.finfo(spec.scale_dtype).max)  # finite steps
    steps = torch.where(torch.rand(blocks, 2, k, generator=gen) < 0.1, 0.0, steps)
    if not spec.signed_offsets:
        steps[:, 1] *= torch.where(torch.rand(blocks, k, generator=gen) < 0.5, -1.0, 1.0)
    return codes, steps.to(steps_dtype or spec.scale_dtype)


def torch_decode(codes, steps, lines, spec):
    return decode_ranges(unpack_range_codes(codes, steps, lines, spec), spec)


def compiled_decode(codes, steps, lines, spec):
    return kernels.decode_ranges(
        codes, steps, lines, spec.range_bits, spec.range_block, spec.signed_offsets, spec.scale_dtype
    )


@compiled
@pytest.mark.parametrize("lines", [37, 4099])  # short last blocks; 4099: several tiles of codes
@pytest.mark.parametrize("signed", [True, False], ids=["format3", "format2"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("range_bits", [4, 5, 6, 7, 8])
def test_compiled_decode_matches_torch_bit_for_bit(range_bits, k, block, dtype, signed, lines):
    spec = QuantSpec(
        4, k, fit="mse", range_bits=range_bits, range_block=block, scale_dtype=dtype, signed_offsets=signed
    )
    codes, steps = random_stored(lines, spec, seed=range_bits * 1000 + k * 100 + lines)
    expected = torch_decode(codes, steps, lines, spec)
    got = compiled_decode(codes, steps, lines, spec)
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == dtype and g.shape == (lines, k)
        assert torch.equal(bits(g), bits(e))
    if dtype == torch.float16 and steps.shape[0] >= 256:  # the cases the test is meant to reach
        assert bool((expected[0].abs() < torch.finfo(dtype).smallest_normal).logical_and(expected[0] != 0).any())
        assert bool(expected[0].isinf().any())


@compiled
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("steps_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_compiled_decode_reads_steps_of_any_float_dtype(dtype, steps_dtype):
    """Steps held in another dtype (a cast model) are read as torch's ``steps.float()`` reads them."""
    spec = QuantSpec(4, 2, fit="mse", range_bits=6, range_block=8, scale_dtype=dtype)
    codes, steps = random_stored(101, spec, seed=7, steps_dtype=steps_dtype)
    for e, g in zip(torch_decode(codes, steps, 101, spec), compiled_decode(codes, steps, 101, spec), strict=True):
        assert torch.equal(bits(g), bits(e))


@compiled
@pytest.mark.parametrize("k", [1, 3])
def test_compiled_decode_in_parallel_chunks(k):
    """Several threads: chunks of lines start and end inside runs of eight codes and inside blocks."""
    spec = QuantSpec(4, k, fit="mse", range_bits=7, range_block=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for lines in (20001, 33333):
            codes, steps = random_stored(lines, spec, seed=lines)
            for e, g in zip(
                torch_decode(codes, steps, lines, spec), compiled_decode(codes, steps, lines, spec), strict=True
            ):
                assert torch.equal(bits(g), bits(e))
    finally:
        torch.set_num_threads(threads)


@compiled
def test_compiled_decode_of_no_lines():
    spec = QuantSpec(4, 2, fit="mse", range_bits=6, range_block=8)
    scale, offset = compiled_decode(torch.empty(0, dtype=torch.uint8), torch.empty(0, 2, 2).half(), 0, spec)
    assert scale.shape == offset.shape == (0, 2)


@compiled
def test_compiled_decode_rejects_wrong_sizes():
    spec = QuantSpec(4, 1, fit="mse", range_bits=6, range_block=8)
    codes, steps = random_stored(40, spec, seed=1)
    with pytest.raises(RuntimeError, match="bytes"):
        compiled_decode(codes[:-1], steps, 40, spec)
    with pytest.raises(RuntimeError, match="step pairs"):
        compiled_decode(codes, steps[:-1], 40, spec)


@pytest.mark.parametrize("steps_dtype", [None, torch.float32], ids=["stored", "cast-fp32"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_layer_decode_is_the_same_with_the_kernels_off(dtype, steps_dtype, monkeypatch):
    """``decode_layer_ranges`` gives the same bits on the compiled path and on the pure-torch fallback."""
    spec = QuantSpec(4, 2, fit="mse", range_bits=5, range_block=16, scale_dtype=dtype)
    rows, groups = 19, 7
    codes, steps = random_stored(rows * groups, spec, seed=3, steps_dtype=steps_dtype)
    auto = decode_layer_ranges(codes, steps, rows, groups, spec)
    forced = decode_layer_ranges(codes, steps, rows, groups, spec, compiled=kernels.available())
    monkeypatch.setenv(kernels.ENV_VAR, "off")
    off = decode_layer_ranges(codes, steps, rows, groups, spec)
    torch_path = decode_layer_ranges(codes, steps, rows, groups, spec, compiled=False)
    for f, o, t in zip(forced, off, torch_path, strict=True):
        assert torch.equal(bits(f), bits(o)) and torch.equal(bits(t), bits(o))
    for a, o in zip(auto, off, strict=True):
        assert a.dtype == o.dtype == steps.dtype and a.shape == (rows, groups, 2)
        assert torch.equal(bits(a), bits(o))
