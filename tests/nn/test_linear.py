"""SplitQuantLinear: forward against independently built branches, conversions, state_dict, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimum_splitquant.core import QuantSpec, cluster_ids, packed_row_bytes
from optimum_splitquant.nn import SplitQuantLinear
from tests.helpers import reference_minmax

DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def spec_id(spec: QuantSpec) -> str:
    g = "row" if spec.group_size is None else f"g{spec.group_size}"
    return f"b{spec.bits}-k{spec.num_clusters}-{g}-{spec.clustering}-{DTYPE_IDS[spec.scale_dtype]}"


def make_linear(in_f: int = 64, out_f: int = 48, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.view(-1)[:: max(1, layer.weight.numel() // 20)] *= 8  # a few outliers
        if bias:
            layer.bias.normal_()
    return layer


def make_input(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reference_branches(weight: torch.Tensor, spec: QuantSpec) -> list[torch.Tensor]:
    """The paper's separate layers: per cluster, the masked weight quantized by its own per-row min-max."""
    ids = cluster_ids(weight, spec)
    return [
        reference_minmax(weight, spec.bits, spec.scale_dtype, mask=ids == j, group_size=spec.group_size)[0]
        for j in range(spec.num_clusters)
    ]


SPECS = [
    QuantSpec(2, 3, None, "tensor", torch.float16),
    QuantSpec(2, 3, 16, "tensor", torch.float16),
    QuantSpec(4, 3, 32, "channel", torch.float32),
    QuantSpec(3, 4, None, "channel", torch.bfloat16),
    QuantSpec(8, 1, 16, "tensor", torch.float32),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_forward_equals_sum_of_independent_branches(spec: QuantSpec, bias: bool) -> None:
    linear = make_linear(bias=bias)
    q = SplitQuantLinear.from_float(linear, spec)
    assert q.is_quantized
    x = make_input(2, 5, 64)
    branches = reference_branches(linear.weight.detach(), spec)
    expected = sum(F.linear(x, b) for b in branches)
    if bias:
        expected = expected + linear.bias.detach()
    out = q(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    # The same weights, compared directly: the one-matmul weight is exactly the sum of the branches.
    assert torch.equal(q.dequantize_weight(), sum(branches))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_dequantize_returns_equivalent_linear(bias: bool) -> None:
    spec = QuantSpec(2, 3, 16)
    q = SplitQuantLinear.from_float(make_linear(bias=bias), spec)
    plain = q.dequantize()
    assert type(plain) is nn.Linear
    assert (plain.in_features, plain.out_features) == (64, 48)
    assert torch.equal(plain.weight, q.dequantize_weight())
    assert torch.equal(q.weight, q.dequantize_weight())  # the read-only ``weight`` view
    if bias:
        assert torch.equal(plain.bias, q.bias)
    else:
        assert plain.bias is None
    x = make_input(7, 64)
    assert torch.equal(plain(x), q(x))


def test_dequantize_to_bfloat16() -> None:
    q = SplitQuantLinear.from_float(make_linear(), QuantSpec(4, 3))
    plain = q.dequantize(torch.bfloat16)
    assert plain.weight.dtype == torch.bfloat16 and plain.bias.dtype == torch.bfloat16
    assert torch.equal(plain.weight, q.dequantize_weight(torch.bfloat16))
    x = make_input(3, 64, dtype=torch.bfloat16)
    assert torch.equal(plain(x), q(x))


@pytest.mark.parametrize("spec", [QuantSpec(2, 3), QuantSpec(4, 3, 16, "channel", torch.float32)], ids=spec_id)
def test_conv1d_transposed_weight(spec: QuantSpec) -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    conv = Conv1D(nf=48, nx=64)
    with torch.no_grad():
        conv.bias.normal_()
    assert conv.weight.shape == (64, 48)
    q = SplitQuantLinear.from_float(conv, spec, source="conv1d")
    assert (q.in_features, q.out_features, q.source) == (64, 48, "conv1d")
    assert q.weight.shape == (64, 48)  # the replaced layer's own layout
    # Rows of the packed weight are output channels: the same as quantizing the transposed weight as a Linear.
    as_linear = nn.Linear(64, 48)
    with torch.no_grad():
        as_linear.weight.copy_(conv.weight.t())
        as_linear.bias.copy_(conv.bias)
    ref = SplitQuantLinear.from_float(as_linear, spec)
    assert torch.equal(q.weight_packed, ref.weight_packed)
    assert torch.equal(q.weight_scale, ref.weight_scale)
    assert torch.equal(q.weight_offset, ref.weight_offset)
    assert torch.equal(q.dequantize_weight(), sum(reference_branches(conv.weight.detach().t(), spec)))

    conv_hat = copy.deepcopy(conv)
    with torch.no_grad():
        conv_hat.weight.copy_(q.dequantize_weight().t())
    x = make_input(2, 5, 64)
    with torch.no_grad():
        expected = conv_hat(x)
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("source", ["linear", "conv1d"])
def test_quantize_rejects_wrong_shape(source: str) -> None:
    layer = SplitQuantLinear(64, 48, spec=QuantSpec(2, 3), source=source, float_weight=True)
    right = (48, 64) if source == "linear" else (64, 48)
    wrong = right[::-1]
    with pytest.raises(ValueError, match="shape"):
        layer.quantize_(torch.randn(*wrong))
    with pytest.raises(ValueError, match="shape"):
        layer.quantize_(torch.randn(48, 63))
    assert not layer.is_quantized
    layer.quantize_(torch.randn(*right))
    assert layer.is_quantized


def test_forward_before_quantize_raises() -> None:
    spec = QuantSpec(2, 3)
    layer = SplitQuantLinear(64, 48, spec=spec, float_weight=True)
    assert not layer.is_quantized
    assert "weight" in dict(layer.named_parameters())
    with pytest.raises(RuntimeError, match="quantize_"):
        layer(make_input(3, 64))
    linear = make_linear()
    with torch.no_grad():
        layer.bias.copy_(linear.bias)
    layer.quantize_(linear.weight.detach())
    assert layer.is_quantized
    assert "weight" not in dict(layer.named_parameters())
    x = make_input(3, 64)
    assert torch.equal(layer(x), SplitQuantLinear.from_float(linear, spec)(x))


@pytest.mark.parametrize(
    ("spec", "storage_bits", "expected"),
    [
        # 384*384 weights at 2 + 2 id bits, plus fp16 scale and offset for 384 rows x 3 clusters
        pytest.param(
            QuantSpec(2, 3, None, "tensor", torch.float16), 384 * 384 * 4 + 2 * 384 * 3 * 16, 4.25, id="b2-k3-fp16"
        ),
        # 4 code bits, plus fp32 scale and offset per 32 weights
        pytest.param(
            QuantSpec(4, 1, 32, "tensor", torch.float32), 384 * 384 * 4 + 2 * 384 * 12 * 32, 6.0, id="b4-k1-g32-fp32"
        ),
        # 8 + 4 id bits, plus bf16 scale and offset for 384 rows x 16 clusters
        pytest.param(
            QuantSpec(8, 16, None, "tensor", torch.bfloat16),
            384 * 384 * 12 + 2 * 384 * 16 * 16,
            12 + 4 / 3,
            id="b8-k16-bf16",
        ),
    ],
)
def test_effective_bits(spec: QuantSpec, storage_bits: int, expected: float) -> None:
    layer = SplitQuantLinear(384, 384, spec=spec)
    assert layer.storage_bits() == storage_bits
    assert layer.effective_bits() == pytest.approx(expected, rel=1e-15)
    assert layer.effective_bits() == storage_bits / (384 * 384)


def test_effective_bits_after_quantizing_real_shape() -> None:
    q = SplitQuantLinear.from_float(make_linear(384, 384), QuantSpec(2, 3, None, "tensor", torch.float16))
    assert q.effective_bits() == (384 * 384 * 4 + 2 * 384 * 3 * 16) / (384 * 384) == 4.25


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    "spec",
    [QuantSpec(2, 3, None, "tensor", torch.float16), QuantSpec(3, 5, 20, "channel", torch.bfloat16)],
    ids=spec_id,
)
def test_state_dict_layout_and_round_trip(spec: QuantSpec, bias: bool) -> None:
    in_f, out_f = 60, 24
    q = SplitQuantLinear.from_float(make_linear(in_f, out_f, bias=bias), spec)
    sd = q.state_dict()
    expected_keys = {"weight_packed", "weight_scale", "weight_offset"} | ({"bias"} if bias else set())
    assert set(sd) == expected_keys
    groups = 1 if spec.group_size is None else in_f // spec.group_size
    assert sd["weight_packed"].dtype == torch.uint8
    assert sd["weight_packed"].shape == (out_f, packed_row_bytes(in_f, spec.symbol_width))
    assert sd["weight_packed"].shape == (out_f, -(-in_f // 8) * (spec.bits + spec.id_bits))
    for name in ("weight_scale", "weight_offset"):
        assert sd[name].dtype == spec.scale_dtype
        assert sd[name].shape == (out_f, groups, spec.num_clusters)
    if bias:
        assert sd["bias"].dtype == torch.float32 and sd["bias"].shape == (out_f,)

    fresh = SplitQuantLinear(in_f, out_f, bias=bias, spec=spec)
    fresh.load_state_dict(sd)
    x = make_input(4, in_f)
    assert torch.equal(fresh(x), q(x))


def test_bfloat16_input() -> None:
    q = SplitQuantLinear.from_float(make_linear(), QuantSpec(2, 3))
    x = make_input(2, 3, 64)
    out = q(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 48)
    ref = q(x)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))


def test_bfloat16_layer() -> None:
    linear = make_linear().to(torch.bfloat16)
    spec = QuantSpec(4, 3)
    q = SplitQuantLinear.from_float(linear, spec)
    assert q.bias.dtype == torch.bfloat16
    assert torch.equal(q.dequantize_weight(), sum(reference_branches(linear.weight.detach(), spec)))
    out = q(make_input(5, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_invalid_source_and_group_size() -> None:
    with pytest.raises(ValueError, match="source"):
        SplitQuantLinear(64, 48, spec=QuantSpec(2), source="conv2d")
    with pytest.raises(ValueError, match="group_size"):
        SplitQuantLinear(60, 48, spec=QuantSpec(2, group_size=32))


def test_extra_repr_mentions_settings() -> None:
    text = repr(SplitQuantLinear(64, 48, spec=QuantSpec(3, 4, 16, "channel")))
    for part in ("in_features=64", "out_features=48", "bits=3", "num_clusters=4", "group=16", "clustering=channel"):
        assert part in text
