"""Compiled CPU kernels against the pure-torch path: same bits for dequantization, fp32 sums for linear.

Every instruction-set level this CPU supports is exercised (``isa`` 0 scalar, 1 AVX2, 2 AVX-512).
The tests skip when the kernels cannot be built here, unless ``OPTIMUM_SPLITQUANT_KERNELS=require``
(then they fail): CI sets it on machines with a compiler.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimum_splitquant import kernels
from optimum_splitquant.core import QuantSpec, dequantize_weight, quantize_weight

DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@pytest.fixture(scope="module")
def isas() -> list[int]:
    """The ISA levels to test: every level up to the best this CPU runs."""
    st = kernels.status()  # raises under OPTIMUM_SPLITQUANT_KERNELS=require if the build fails
    if not st.active:
        pytest.skip(f"compiled kernels unavailable: {st.reason}")
    return list(range(kernels.ISA_NAMES.index(st.isa) + 1))


def spec_id(spec: QuantSpec) -> str:
    g = "row" if spec.group_size is None else f"g{spec.group_size}"
    return f"b{spec.bits}-k{spec.num_clusters}-{g}-{DTYPE_IDS[spec.scale_dtype]}-w{spec.symbol_width}"


def make_weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(out_f, in_f, generator=gen)
    if w.numel():
        w.view(-1)[:: max(1, w.numel() // 17)] *= 12  # outliers, so the clusters differ
    return w


def fp32_sum_bound(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Allowed |fused - plain|: 1e-5 of sum |x_i w_i| (+|b|), covering any fp32 summation order here."""
    mag = x.abs() @ w.abs().t()
    if bias is not None:
        mag = mag + bias.abs()
    return 1e-5 * mag + 1e-30


# Symbol widths 2-8 take the vector paths (all seven occur below); 8 bits with k = 3 (width 10) takes
# the scalar path; group sizes 8 and 24 fall back from AVX-512 to AVX2, group size 5 to scalar code.
SPECS = [
    QuantSpec(2, 1),
    QuantSpec(2, 3),
    QuantSpec(2, 4, 16),
    QuantSpec(3, 3),
    QuantSpec(3, 1, 32, scale_dtype=torch.bfloat16),
    QuantSpec(4, 3, 32, scale_dtype=torch.float32),
    QuantSpec(4, 4),
    QuantSpec(4, 9, 16),
    QuantSpec(4, 5, 16),
    QuantSpec(8, 1),
    QuantSpec(8, 1, 16),
    QuantSpec(8, 3),
    QuantSpec(2, 16),
    QuantSpec(3, 3, 8),
    QuantSpec(2, 3, 24),
    QuantSpec(4, 3, 5),
]


def shapes_for(spec: QuantSpec) -> list[tuple[int, int]]:
    """Odd shapes: in_features not a multiple of 8 or 16, one row, one column; group multiples when grouped."""
    if spec.group_size is None:
        return [(7, 13), (33, 96), (1, 200), (5, 1), (17, 240)]
    g = spec.group_size
    return [(7, g), (33, 3 * g), (1, 5 * g)]


CASES = [
    pytest.param(spec, shape, id=f"{spec_id(spec)}-{shape[0]}x{shape[1]}")
    for spec in SPECS
    for shape in shapes_for(spec)
]


def quantized(spec: QuantSpec, out_f: int, in_f: int, seed: int = 0):
    return quantize_weight(make_weight(out_f, in_f, seed), spec)


@pytest.mark.parametrize(("spec", "shape"), CASES)
def test_dequantize_is_bit_identical(spec: QuantSpec, shape: tuple[int, int], isas: list[int]) -> None:
    q = quantized(spec, *shape)
    ref = dequantize_weight(q.packed, q.scale, q.offset, q.in_features, spec)
    for isa in isas:
        out = kernels.dequantize(q.packed, q.scale, q.offset, q.in_features, spec.bits, spec.symbol_width, isa=isa)
        assert out.dtype == torch.float32 and out.shape == shape
        assert torch.equal(out, ref), f"isa {kernels.ISA_NAMES[isa]}"


@pytest.mark.parametrize("tokens", [1, 3, 8], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("spec", "shape"), CASES)
def test_linear_matches_dequantize_then_matmul(
    spec: QuantSpec, shape: tuple[int, int], bias: bool, tokens: int, isas: list[int]
) -> None:
    q = quantized(spec, *shape, seed=tokens)
    w = dequantize_weight(q.packed, q.scale, q.offset, q.in_features, spec)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, shape[1], generator=gen)
    b = torch.randn(shape[0], generator=gen) if bias else None
    ref = F.linear(x, w, b)
    bound = fp32_sum_bound(x, w, b)
    for isa in isas:
        y = kernels.linear(x, q.packed, q.scale, q.offset, b, q.in_features, spec.bits, spec.symbol_width, isa=isa)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert bool(((y - ref).abs() <= bound).all()), f"isa {kernels.ISA_NAMES[isa]}: {(y - ref).abs().max()}"


@pytest.mark.parametrize("spec", [QuantSpec(2, 3), QuantSpec(4, 3, 16), QuantSpec(3, 3)], ids=spec_id)
def test_token_results_do_not_depend_on_the_batch(spec: QuantSpec, isas: list[int]) -> None:
    """Each token is summed alone in a fixed order: batching or threading never changes a bit."""
    q = quantized(spec, 37, 160)
    x = torch.randn(7, 160, generator=torch.Generator().manual_seed(2))
    for isa in isas:
        whole = kernels.linear(x, q.packed, q.scale, q.offset, None, 160, spec.bits, spec.symbol_width, isa=isa)
        for m in range(7):
            one = kernels.linear(
                x[m : m + 1], q.packed, q.scale, q.offset, None, 160, spec.bits, spec.symbol_width, isa=isa
            )
            assert torch.equal(one[0], whole[m])
        assert torch.equal(
            kernels.linear(x, q.packed, q.scale, q.offset, None, 160, spec.bits, spec.symbol_width, isa=isa), whole
        )


def test_large_layer_uses_threads_and_stays_exact(isas: list[int]) -> None:
    """A layer big enough to be split over threads (> 1M weights)."""
    spec = QuantSpec(2, 3)
    q = quantized(spec, 1100, 1000)
    ref = dequantize_weight(q.packed, q.scale, q.offset, 1000, spec)
    assert torch.equal(kernels.dequantize(q.packed, q.scale, q.offset, 1000, spec.bits, spec.symbol_width), ref)
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    y = kernels.linear(x, q.packed, q.scale, q.offset, None, 1000, spec.bits, spec.symbol_width)
    assert bool(((y - F.linear(x, ref)).abs() <= fp32_sum_bound(x, ref, None)).all())


def test_empty_shapes(isas: list[int]) -> None:
    spec = QuantSpec(2, 3)
    q = quantize_weight(torch.zeros(0, 16), spec)
    assert kernels.dequantize(q.packed, q.scale, q.offset, 16, spec.bits, spec.symbol_width).shape == (0, 16)
    assert kernels.linear(
        torch.randn(2, 16), q.packed, q.scale, q.offset, None, 16, spec.bits, spec.symbol_width
    ).shape == (2, 0)
    q = quantized(spec, 4, 16)
    assert kernels.linear(
        torch.zeros(0, 16), q.packed, q.scale, q.offset, None, 16, spec.bits, spec.symbol_width
    ).shape == (0, 4)


def test_invalid_cluster_ids_read_as_zero(isas: list[int]) -> None:
    """Ids >= k (rejected by SplitQuantLinear.validate) must not read outside the tables."""
    spec = QuantSpec(2, 3)
    q = quantized(spec, 4, 32)
    packed = torch.full_like(q.packed, 0xFF)  # every symbol = id 3, code 3
    for isa in isas:
        assert torch.equal(
            kernels.dequantize(packed, q.scale, q.offset, 32, spec.bits, spec.symbol_width, isa=isa), torch.zeros(4, 32)
        ), kernels.ISA_NAMES[isa]


def test_bad_arguments_raise(isas: list[int]) -> None:
    spec = QuantSpec(2, 3)
    q = quantized(spec, 4, 32)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.linear(
            torch.randn(1, 32, dtype=torch.float64), q.packed, q.scale, q.offset, None, 32, spec.bits, spec.symbol_width
        )
    with pytest.raises(RuntimeError, match="in_features"):
        kernels.linear(torch.randn(1, 31), q.packed, q.scale, q.offset, None, 32, spec.bits, spec.symbol_width)
    with pytest.raises(RuntimeError, match="row bytes"):
        kernels.dequantize(q.packed, q.scale, q.offset, 40, spec.bits, spec.symbol_width)
    with pytest.raises(RuntimeError, match="bias"):
        kernels.linear(
            torch.randn(1, 32), q.packed, q.scale, q.offset, torch.zeros(5), 32, spec.bits, spec.symbol_width
        )


def test_fake_implementations_give_shapes(isas: list[int]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = QuantSpec(2, 3)
    q = quantized(spec, 6, 24)
    with FakeTensorMode() as mode:
        packed, scale, offset = (mode.from_tensor(t) for t in (q.packed, q.scale, q.offset))
        assert kernels.dequantize(packed, scale, offset, 24, spec.bits, spec.symbol_width).shape == (6, 24)
        x = mode.from_tensor(torch.randn(3, 24))
        assert kernels.linear(x, packed, scale, offset, None, 24, spec.bits, spec.symbol_width).shape == (3, 6)
