"""SplitQuantConv2d: forward against independently built branches, geometry, state_dict, conversions, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimum_splitquant.core import QuantSpec, cluster_ids, decode_symbols, kmeans_1d, packed_row_bytes
from optimum_splitquant.nn import SplitQuantConv2d, SplitQuantLinear
from tests.helpers import reference_minmax

GEOMETRIES = {
    "3x3": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1),
    "stride2-no-pad": dict(in_channels=6, out_channels=10, kernel_size=(3, 2), stride=2),
    "grouped-dilated": dict(in_channels=8, out_channels=12, kernel_size=3, padding=2, dilation=2, groups=4),
    "depthwise-7x7": dict(in_channels=8, out_channels=8, kernel_size=7, padding=3, groups=8),
    "pointwise": dict(in_channels=16, out_channels=8, kernel_size=1),
    "same-reflect": dict(in_channels=4, out_channels=6, kernel_size=(3, 4), padding="same", padding_mode="reflect"),
    "circular": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="circular"),
}
SPECS = {
    "b2-k3-tensor": QuantSpec(2, 3),
    "b4-k3-channel-fp32": QuantSpec(4, 3, None, "channel", torch.float32),
    "b3-k4-bf16": QuantSpec(3, 4, None, "tensor", torch.bfloat16),
}


def make_conv(seed: int = 0, bias: bool = True, **geometry) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(**geometry, bias=bias)
    with torch.no_grad():
        conv.weight.view(-1)[:: max(1, conv.weight.numel() // 15)] *= 8  # a few outliers
        if bias:
            conv.bias.normal_()
    return conv


def make_input(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference_kernel(conv: nn.Conv2d, spec: QuantSpec) -> torch.Tensor:
    """The paper's branches over the kernel seen as (out, in/groups*kh*kw) rows, quantized separately and summed."""
    rows = conv.weight.detach().reshape(conv.out_channels, -1)
    ids = cluster_ids(rows, spec)
    total = torch.zeros_like(rows)
    for j in range(spec.num_clusters):
        total += reference_minmax(rows, spec.bits, spec.scale_dtype, mask=ids == j, group_size=spec.group_size)[0]
    return total.reshape(conv.weight.shape)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("spec_id", list(SPECS))
def test_forward_equals_conv_with_reference_kernel(spec_id: str, geometry: str, bias: bool) -> None:
    spec, geo = SPECS[spec_id], GEOMETRIES[geometry]
    conv = make_conv(bias=bias, **geo)
    q = SplitQuantConv2d.from_float(conv, spec)
    kernel = reference_kernel(conv, spec)
    assert torch.equal(q.weight, kernel)  # bit-exact: same maths as the Linear rows
    ref = nn.Conv2d(**geo, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(kernel)
        if bias:
            ref.bias.copy_(conv.bias)
    x = make_input(2, geo["in_channels"], 11, 9)
    with torch.no_grad():
        expected = ref(x)
        out = q(x)
    assert out.shape == expected.shape
    assert torch.equal(out, expected)  # the same conv2d call on the same kernel


def test_channel_clustering_is_per_output_kernel() -> None:
    conv = make_conv(**GEOMETRIES["3x3"])
    spec = QuantSpec(2, 3, None, "channel", torch.float32)
    q = SplitQuantConv2d.from_float(conv, spec)
    got, _ = decode_symbols(q.weight_packed, q.in_features, spec)
    for o in range(conv.out_channels):
        kernel = conv.weight.detach()[o].reshape(1, -1)
        bounds = kmeans_1d(kernel, 3).boundaries
        expected = torch.searchsorted(bounds.contiguous(), kernel.double().contiguous())
        assert torch.equal(got[o], expected[0]), f"kernel {o}"


def test_is_a_linear_over_unfolded_patches() -> None:
    """The packed rows equal a SplitQuantLinear over the flattened kernels: same bytes, same scales."""
    conv = make_conv(**GEOMETRIES["grouped-dilated"])
    spec = QuantSpec(3, 3, 6, "tensor", torch.float16)
    q = SplitQuantConv2d.from_float(conv, spec)
    lin = nn.Linear(q.in_features, q.out_features)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
    ql = SplitQuantLinear.from_float(lin, spec)
    assert (q.in_features, q.out_features) == (2 * 9, 12)
    for name in ("weight_packed", "weight_scale", "weight_offset"):
        assert torch.equal(getattr(q, name), getattr(ql, name)), name
    assert q.effective_bits() == ql.effective_bits()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_state_dict_layout_and_round_trip(bias: bool) -> None:
    geo = GEOMETRIES["depthwise-7x7"]
    spec = QuantSpec(2, 3, 7, "tensor", torch.float16)
    q = SplitQuantConv2d.from_float(make_conv(bias=bias, **geo), spec)
    sd = q.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale", "weight_offset"} | ({"bias"} if bias else set())
    width = 1 * 7 * 7
    assert sd["weight_packed"].dtype == torch.uint8
    assert sd["weight_packed"].shape == (8, packed_row_bytes(width, 4)) == (8, 7 * 4)
    for name in ("weight_scale", "weight_offset"):
        assert sd[name].dtype == torch.float16 and sd[name].shape == (8, 7, 3)
    with torch.device("meta"):
        fresh = SplitQuantConv2d(8, 8, 7, padding=3, groups=8, bias=bias, spec=spec)
    fresh = fresh.to_empty(device="cpu")
    fresh.load_state_dict(sd)
    fresh.validate()
    x = make_input(1, 8, 10, 10)
    assert torch.equal(fresh(x), q(x))


def test_float_placeholder_then_quantize() -> None:
    spec = QuantSpec(4, 3)
    conv = make_conv(**GEOMETRIES["3x3"])
    layer = SplitQuantConv2d(8, 12, 3, padding=1, spec=spec, float_weight=True)
    assert not layer.is_quantized and layer.weight.shape == (12, 8, 3, 3)
    with pytest.raises(RuntimeError, match="quantize_"):
        layer(make_input(1, 8, 5, 5))
    with pytest.raises(ValueError, match="kernel of shape"):
        layer.quantize_(torch.randn(12, 72))
    with torch.no_grad():
        layer.bias.copy_(conv.bias)
    layer.quantize_(conv.weight.detach())
    assert layer.is_quantized and "weight" not in dict(layer.named_parameters())
    x = make_input(2, 8, 6, 6)
    assert torch.equal(layer(x), SplitQuantConv2d.from_float(conv, spec)(x))


def test_dequantize_returns_equivalent_conv2d() -> None:
    geo = GEOMETRIES["same-reflect"]
    q = SplitQuantConv2d.from_float(make_conv(**geo), QuantSpec(2, 3))
    plain = q.dequantize()
    assert type(plain) is nn.Conv2d
    assert (plain.padding, plain.padding_mode, plain.kernel_size) == ("same", "reflect", (3, 4))
    assert torch.equal(plain.weight, q.weight)
    x = make_input(2, 4, 7, 8)
    with torch.no_grad():
        assert torch.equal(plain(x), q(x))


def test_weight_cache_gives_the_same_output() -> None:
    q = SplitQuantConv2d.from_float(make_conv(**GEOMETRIES["3x3"]), QuantSpec(2, 3))
    x = make_input(2, 8, 6, 6)
    expected = q(x)
    assert q.cache_weight_() == 12 * 72 * 4
    assert torch.equal(q(x), expected)
    q.clear_weight_cache_()
    assert torch.equal(q(x), expected)


def test_bfloat16_input_and_effective_bits() -> None:
    q = SplitQuantConv2d.from_float(make_conv(**GEOMETRIES["pointwise"]), QuantSpec(2, 3))
    x = make_input(1, 16, 4, 4)
    out = q(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    ref = q(x)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
    # 16 weights per kernel: 2 packed symbol bytes x 4 bits, plus fp16 scale and offset for 3 clusters
    assert q.storage_bits() == 8 * (16 * 4 + 2 * 3 * 16)
    assert q.effective_bits() == q.storage_bits() / (8 * 16)


def test_errors() -> None:
    spec = QuantSpec(2, 3)
    with pytest.raises(ValueError, match="groups"):
        SplitQuantConv2d(6, 8, 3, groups=4, spec=spec)
    with pytest.raises(ValueError, match="padding_mode"):
        SplitQuantConv2d(4, 8, 3, padding_mode="mirror", spec=spec)
    with pytest.raises(TypeError, match="Conv2d"):
        SplitQuantConv2d.from_float(nn.Linear(4, 4), spec)
    with pytest.raises(ValueError, match="group_size"):
        SplitQuantConv2d(4, 8, 3, spec=QuantSpec(2, group_size=8))  # 36 columns per kernel


def test_extra_repr() -> None:
    q = SplitQuantConv2d.from_float(make_conv(**GEOMETRIES["grouped-dilated"]), QuantSpec(2, 3))
    text = repr(q)
    assert "kernel_size=(3, 3)" in text and "groups=4" in text and "bits=2" in text
    q.validate()
