"""The compute choice (made once per layer), transient coded ranges, and one float twin per layer kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from optimum_splitquant import kernels
from optimum_splitquant.core import QuantSpec
from optimum_splitquant.core.quantize import quantize_weight
from optimum_splitquant.kernels import triton_ops
from optimum_splitquant.layers import KINDS, layer_kind
from optimum_splitquant.nn import SplitQuantConv2d, SplitQuantLinear, compact, compute, select_compute

CODED = QuantSpec(bits=4, num_clusters=1, group_size=32, fit="mse", range_bits=6)  # for_budget(4.5)
PLAIN = QuantSpec(2, 3)
SPECS = {"coded": CODED, "plain": PLAIN}


def make_layer(spec: QuantSpec, in_f: int = 96, out_f: int = 40) -> SplitQuantLinear:
    torch.manual_seed(0)
    return SplitQuantLinear.from_float(nn.Linear(in_f, out_f), spec)


def make_input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _no_decision(*args, **kwargs):
    raise AssertionError("the forward pass decided its path again")


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_forward_runs_the_strategy_chosen_when_quantized(spec: QuantSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(spec)
    assert layer.compute_path is compute.select_path("cpu")
    assert layer._forward_strategy is SplitQuantLinear._forward_packed
    x = make_input(5, 96)
    with torch.no_grad():
        expected = F.linear(x, layer.dequantize_weight(), layer.bias)
    for module, name in ((kernels, "available"), (triton_ops, "available"), (compute, "select_path")):
        monkeypatch.setattr(module, name, _no_decision)
    monkeypatch.setattr(compact, "select_path", _no_decision)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


def test_the_choice_follows_the_cache_the_switches_and_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(PLAIN)
    layer.cache_weight_()
    assert layer._forward_strategy is SplitQuantLinear._forward_cached
    layer.clear_weight_cache_()
    assert layer._forward_strategy is SplitQuantLinear._forward_packed
    monkeypatch.setenv(kernels.ENV_VAR, "off")
    select_compute(nn.Sequential(layer))
    assert layer.compute_path is compute.TORCH
    monkeypatch.delenv(kernels.ENV_VAR)
    layer.to(torch.float64)  # a move or cast chooses again
    assert layer.compute_path is compute.select_path("cpu")
    meta = SplitQuantLinear(96, 40, spec=PLAIN, device="meta")
    assert meta.compute_path is compute.AUTO  # offloaded or not loaded yet: the tensors' device decides per call
    never = SplitQuantLinear(96, 40, spec=PLAIN, float_weight=True)
    with pytest.raises(RuntimeError, match="never given its weight"):
        never(make_input(1, 96))


def test_load_state_dict_chooses_again() -> None:
    source = make_layer(CODED)
    layer = SplitQuantLinear(96, 40, spec=CODED, device="meta")
    layer.load_state_dict(source.state_dict(), assign=True)
    assert layer.compute_path is compute.select_path("cpu")
    x = make_input(3, 96)
    with torch.no_grad():
        assert torch.equal(layer(x), source(x))


def test_gradient_flows_through_the_chosen_strategy() -> None:
    layer = make_layer(CODED)
    x = make_input(4, 96).requires_grad_()
    layer(x).sum().backward()
    w = layer.dequantize_weight()
    assert torch.allclose(x.grad, torch.ones(4, 40) @ w)


def test_coded_ranges_are_decoded_per_use_and_match_the_quantization() -> None:
    layer = make_layer(CODED)
    torch.manual_seed(0)
    q = quantize_weight(nn.Linear(96, 40).weight.detach(), CODED)
    scale, offset = layer.ranges()
    assert torch.equal(scale, q.scale) and torch.equal(offset, q.offset)
    assert layer.ranges()[0] is not scale  # decoded again: nothing kept
    assert set(layer._buffers) == {"weight_packed", "weight_range_codes", "weight_range_steps"}


@pytest.mark.parametrize("loaded", [False, True], ids=["quantized", "loaded"])
def test_memory_footprint_is_what_is_stored(loaded: bool) -> None:
    layer = make_layer(CODED, in_f=576, out_f=192)
    if loaded:
        again = SplitQuantLinear(576, 192, spec=CODED)
        again.load_state_dict(layer.state_dict())
        layer = again
    weights = layer.in_features * layer.out_features
    footprint = PreTrainedModel.get_memory_footprint(layer)  # parameters and buffers, as transformers counts
    bits_per_weight = (footprint - layer.bias.nbytes) * 8 / weights
    assert bits_per_weight <= layer.effective_bits() + 0.1
    assert layer.effective_bits() <= 4.5


def test_conv1d_twins_agree() -> None:
    torch.manual_seed(0)
    conv = Conv1D(24, 64)
    layer = SplitQuantLinear.from_float(conv, PLAIN, source="conv1d")
    twin = layer.dequantize()
    from_kind = layer_kind(layer).to_float(layer)
    assert type(twin) is type(from_kind) is Conv1D
    assert twin.weight.shape == conv.weight.shape
    assert torch.equal(twin.weight, from_kind.weight) and torch.equal(twin.bias, conv.bias)
    assert torch.equal(twin.weight, layer.weight)
    x = make_input(3, 64)
    with torch.no_grad():
        assert torch.allclose(twin(x), layer(x), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_modules_and_the_table_share_one_view(kind) -> None:
    float_layer = {"linear": nn.Linear(64, 8), "conv1d": Conv1D(8, 64), "conv2d": nn.Conv2d(4, 8, 3)}[kind.name]
    q = kind.quantize(float_layer, PLAIN if kind.name != "conv2d" else QuantSpec(2, 3, clustering="channel"))
    assert q.view is kind.view
    assert isinstance(q, SplitQuantConv2d if kind.name == "conv2d" else SplitQuantLinear)
    assert q.float_shape == tuple(float_layer.weight.shape)
    assert kind.dims(float_layer) == kind.dims(q)
    assert type(q.dequantize()) is type(float_layer)
