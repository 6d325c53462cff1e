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


# --- Fast paths (compiled kernels, weight cache, torch.compile) against the plain pure-torch path ---

FAST_SPECS = [
    QuantSpec(2, 3),
    QuantSpec(2, 1, 16),
    QuantSpec(3, 4, 32, "channel", torch.bfloat16),
    QuantSpec(4, 3, 16, "tensor", torch.float32),
    QuantSpec(8, 1),
]


def plain_output(q: SplitQuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The plain path: pure-torch dequantization, then one F.linear in the input's dtype."""
    from optimum_splitquant.core import dequantize_weight

    w = dequantize_weight(q.weight_packed, q.weight_scale, q.weight_offset, q.in_features, q.spec, x.dtype)
    return F.linear(x, w, None if q.bias is None else q.bias.to(x.dtype))


def kernels_active() -> bool:
    from optimum_splitquant import kernels

    return kernels.available()


@pytest.mark.parametrize(
    "shape", [(1, 1, 96), (96,), (2, 5, 96), (3, 96), (40, 96)], ids=["b1-t1", "vector", "b2-t5", "t3", "t40"]
)
@pytest.mark.parametrize("fused_max", [1, 32], ids=["fused-default", "fused-32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("spec", FAST_SPECS, ids=spec_id)
def test_forward_fast_path_matches_plain_path(
    spec: QuantSpec, bias: bool, fused_max: int, shape: tuple[int, ...]
) -> None:
    """Calls with few fp32 tokens run the fused kernel (fp32 summation order only); others are bit-identical."""
    q = SplitQuantLinear.from_float(make_linear(96, 37, bias=bias), spec)
    q.fused_max_tokens = fused_max
    x = make_input(*shape)
    with torch.no_grad():
        out, ref = q(x), plain_output(q, x)
    assert out.shape == (*shape[:-1], 37)
    tokens = x.numel() // 96
    if tokens > fused_max or not kernels_active():
        assert torch.equal(out, ref)
    else:
        w = q.dequantize_weight()
        bound = 1e-5 * (x.abs() @ w.abs().t() + (q.bias.abs() if bias else 0)) + 1e-30
        assert bool(((out - ref).abs() <= bound).all()), float((out - ref).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spec", FAST_SPECS, ids=spec_id)
def test_half_input_is_bit_identical_to_plain_path(spec: QuantSpec, dtype: torch.dtype) -> None:
    q = SplitQuantLinear.from_float(make_linear(96, 37), spec)
    for shape in [(1, 96), (2, 7, 96)]:
        x = make_input(*shape, dtype=dtype)
        with torch.no_grad():
            out = q(x)
        assert out.dtype == dtype
        assert torch.equal(out, plain_output(q, x))


@pytest.mark.parametrize("spec", FAST_SPECS, ids=spec_id)
def test_dequantize_weight_is_bit_identical_to_core(spec: QuantSpec) -> None:
    from optimum_splitquant.core import dequantize_weight

    q = SplitQuantLinear.from_float(make_linear(96, 37), spec)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        expected = dequantize_weight(q.weight_packed, q.weight_scale, q.weight_offset, 96, spec, dtype)
        assert torch.equal(q.dequantize_weight(dtype), expected)


def test_input_requiring_grad_takes_the_differentiable_path() -> None:
    q = SplitQuantLinear.from_float(make_linear(), QuantSpec(2, 3))
    x = make_input(2, 64).requires_grad_()
    out = q(x)
    assert torch.equal(out, plain_output(q, x.detach()))  # not the fused kernel
    out.sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize_weight().sum(0).expand(2, 64))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_backward_recomputes_the_weight_instead_of_keeping_it(bias: bool) -> None:
    q = SplitQuantLinear.from_float(make_linear(96, 80, bias=bias), QuantSpec(2, 3))
    if bias:
        q.bias.requires_grad_(True)
    twin = q.dequantize()  # the float layer with the same weight
    twin.weight.requires_grad_(False)
    x = make_input(3, 5, 96).requires_grad_()
    saved: list[torch.Size] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = q(x)
    assert torch.Size([80, 96]) not in saved  # no float weight kept for the backward pass
    x_twin = x.detach().clone().requires_grad_()
    expected = twin(x_twin)
    assert torch.equal(out, expected)
    grad = make_input(3, 5, 80, seed=7)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-6, atol=1e-6)
    if bias:
        torch.testing.assert_close(q.bias.grad, twin.bias.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_weight_cache_is_opt_in_and_exact(bias: bool) -> None:
    from optimum_splitquant.nn import linear as linear_mod

    q = SplitQuantLinear.from_float(make_linear(bias=bias), QuantSpec(2, 3, 16))
    assert "weight_cache" not in dict(q.named_buffers())  # no hidden float copy by default
    keys = set(q.state_dict())
    x1, x40 = make_input(1, 64), make_input(40, 64)
    with torch.no_grad():
        before = {1: q(x1), 40: q(x40)}
    added = q.cache_weight_()
    assert added == 64 * 48 * 4
    cache = dict(q.named_buffers())["weight_cache"]
    assert torch.equal(cache, q.dequantize_weight())
    assert set(q.state_dict()) == keys  # never saved
    with torch.no_grad():
        assert torch.equal(q(x1), plain_output(q, x1))
        assert torch.equal(q(x40), before[40])
    # dequantize_weight stays a copy: writing into it leaves the cache alone.
    q.dequantize_weight().zero_()
    assert torch.equal(dict(q.named_buffers())["weight_cache"], cache)
    # model.to(bf16) casts the cache; the cast cache equals the plain bf16 weight.
    model = nn.Sequential(q)
    assert linear_mod.disable_weight_cache(model) is None
    assert "weight_cache" not in dict(q.named_buffers())
    assert linear_mod.enable_weight_cache(model) == added
    model.to(torch.bfloat16)
    xb = make_input(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(q(xb), plain_output(q, xb))
    q.quantize_(make_linear(seed=5).weight.detach().to(torch.bfloat16))
    assert "weight_cache" not in dict(q.named_buffers())  # new codes invalidate the cache


def test_weight_cache_counts_in_memory_footprint() -> None:
    from transformers import BertConfig, BertModel

    from optimum_splitquant import SplitQuantConfig, quantize_model
    from optimum_splitquant.nn.linear import disable_weight_cache, enable_weight_cache

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = quantize_model(BertModel(cfg).eval(), SplitQuantConfig(bits=2))
    layers = [m for m in model.modules() if isinstance(m, SplitQuantLinear)]
    packed = sum(m.storage_bits() // 8 for m in layers)
    base = model.get_memory_footprint()
    assert packed > 0 and base >= packed
    added = enable_weight_cache(model)
    assert added == sum(m.in_features * m.out_features * 4 for m in layers)
    assert model.get_memory_footprint() == base + added
    disable_weight_cache(model)
    assert model.get_memory_footprint() == base


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit notices raised while inductor imports
def test_torch_compile_gives_the_same_outputs() -> None:
    """fullgraph=True: the kernels' ops trace as opaque calls with fake shapes, the fallback traces as torch."""
    torch.manual_seed(0)
    model = nn.Sequential(
        SplitQuantLinear.from_float(make_linear(64, 48), QuantSpec(2, 3)),
        nn.ReLU(),
        SplitQuantLinear.from_float(make_linear(48, 40, seed=2), QuantSpec(4, 3, 16)),
        nn.ReLU(),
        SplitQuantLinear.from_float(make_linear(40, 32, seed=3), QuantSpec(4, 1, 8, fit="mse", range_bits=6)),
    ).eval()
    compiled = torch.compile(model, fullgraph=True)
    for shape in [(1, 64), (40, 64)]:  # the fused kernel, then dequantize + GEMM
        x = make_input(*shape)
        with torch.no_grad():
            expected, out = model(x), compiled(x)
        # Inductor may fuse bias and activation into its own loops: fp32 rounding differences only.
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
