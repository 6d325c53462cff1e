"""The table of layer kinds: each kind's matrix view, quantized form, float twin and split form."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from optimum_splitquant.core import QuantSpec
from optimum_splitquant.layers import KINDS, eligible_layers, layer_kind, quantize_layer, replace_layers
from optimum_splitquant.nn import SplitQuantConv2d, SplitQuantLinear, SplitQuantModule


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(24, 10)
    if kind == "conv1d":
        return Conv1D(10, 24)  # nf = 10 outputs, nx = 24 inputs, weight stored (24, 10)
    return nn.Conv2d(6, 4, kernel_size=(3, 2), stride=2, padding=1, groups=2)  # rows of 3 * 3 * 2 = 18 weights


EXPECTED_DIMS = {"linear": (10, 24), "conv1d": (10, 24), "conv2d": (4, 18)}


@pytest.mark.parametrize("name", [k.name for k in KINDS])
def test_kind_views_quantizes_and_restores_its_layer(name):
    layer = make(name)
    kind = layer_kind(layer)
    assert kind.name == name and isinstance(layer, kind.float_type)
    rows = kind.rows(layer.weight.detach())
    assert tuple(rows.shape) == kind.dims(layer) == EXPECTED_DIMS[name]
    assert torch.equal(kind.from_rows(rows, layer.weight.shape), layer.weight.detach())

    q = quantize_layer(layer, QuantSpec(bits=8, num_clusters=3))
    assert isinstance(q, SplitQuantConv2d if name == "conv2d" else SplitQuantLinear)
    assert layer_kind(q) is kind and kind.dims(q) == kind.dims(layer)
    twin = kind.to_float(q)
    assert type(twin) is type(layer) and twin.weight.shape == layer.weight.shape
    assert torch.equal(twin.weight, q.weight)  # the float twin holds exactly the dequantized weight
    assert torch.equal(twin.bias, layer.bias)
    assert (twin.weight - layer.weight).abs().max() < 0.01  # 8-bit codes: close to the original
    weight_ids = (layer.weight.detach() > 0).long()
    split = kind.split_type.from_ids(layer, weight_ids, (layer.bias.detach() > 0).long(), 2)
    assert all(type(b) is kind.float_type for b in split.branches)
    assert torch.equal(split.cluster_ids(), weight_ids)
    merged = split.merge()
    assert type(merged) is type(layer) and torch.equal(merged.weight, layer.weight.detach())


def test_built_empty_layers_match_their_float_layer_on_meta():
    model = nn.Sequential(make("linear"), nn.ReLU(), make("conv1d"), make("conv2d"))
    replace_layers(model, QuantSpec(bits=2, num_clusters=4), ["0", "2", "3"], float_weight=True)
    for index, name in ((0, "linear"), (2, "conv1d"), (3, "conv2d")):
        q = model[index]
        assert isinstance(q, SplitQuantModule) and not q.is_quantized
        assert q.weight.is_meta and tuple(q.weight.shape) == tuple(make(name).weight.shape)
        assert q.source == name


def test_other_modules_have_no_kind():
    assert layer_kind(nn.LayerNorm(4)) is None and layer_kind(nn.Embedding(3, 4)) is None
    assert list(eligible_layers(nn.Sequential(nn.Linear(2, 2), nn.Conv1d(2, 2, 1)))) == ["0"]
    with pytest.raises(TypeError, match="Conv1d"):
        quantize_layer(nn.Conv1d(2, 2, 1), QuantSpec(bits=2))
