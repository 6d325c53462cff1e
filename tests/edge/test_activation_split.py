"""Activation splitting: channel groups from calibrated ranges, float equivalence, composition with the weight split."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optimum_splitquant.core import assign_clusters, kmeans_1d
from optimum_splitquant.edge.activation_split import (
    channel_groups,
    input_channel_ranges,
    split_activations,
    target_layers,
)
from optimum_splitquant.edge.split import split_model
from optimum_splitquant.nn import ChannelSplitLinear, SplitLinear


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.act(self.up(x))))


def calibration(n: int = 3) -> list[dict[str, torch.Tensor]]:
    out = []
    for s in range(n):
        x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(s))
        x[..., 3] *= 20  # an outlier channel, as in transformer hidden states
        out.append({"x": x})
    return out


def test_split_activations_is_equivalent_and_groups_by_range():
    model = Mlp()
    ref_model = copy.deepcopy(model)
    calib = calibration()
    ranges = input_channel_ranges(model, calib, ["up"])
    split_activations(model, calib)
    assert isinstance(model.up, ChannelSplitLinear) and isinstance(model.down, ChannelSplitLinear)
    assert isinstance(model.head, nn.Linear)  # the default head policy leaves the last layer alone
    groups = model.up.groups
    assert sorted(torch.cat(groups).tolist()) == list(range(16))
    assert [3] in [g.tolist() for g in groups]  # the outlier channel gets its own group
    # the groups are the 1-D k-means clusters of the calibrated channel ranges, smallest first
    values = ranges["up"].reshape(1, -1).double()
    ids = assign_clusters(values, kmeans_1d(values, 3).boundaries).reshape(-1)
    assert [g.tolist() for g in groups] == [torch.nonzero(ids == j).reshape(-1).tolist() for j in range(3)]
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_model(x), rtol=1e-5, atol=1e-5)
    # only part 0 carries the bias
    assert model.up.parts[0].bias is not None and all(p.bias is None for p in model.up.parts[1:])


def test_input_channel_ranges_are_max_abs_over_all_batches():
    model = Mlp()
    calib = calibration()
    ranges = input_channel_ranges(model, calib, ["up"])
    expected = torch.stack([b["x"].abs().amax(dim=(0, 1)) for b in calib]).amax(dim=0)
    assert torch.equal(ranges["up"], expected)


def test_composes_with_weight_split_and_merges_back_exactly():
    model = Mlp()
    ref_model = copy.deepcopy(model)
    split_model(model, modules_to_not_convert=[])
    split_activations(model, calibration(), modules_to_not_convert=[])
    for name in ("up", "down", "head"):
        layer = getattr(model, name)
        assert isinstance(layer, ChannelSplitLinear)
        assert all(isinstance(p, SplitLinear) and p.num_clusters == 3 for p in layer.parts)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_model(x), rtol=1e-5, atol=1e-5)
    merged = model.up.merge()
    assert isinstance(merged, SplitLinear)
    assert torch.equal(merged.weight, ref_model.up.weight.detach())
    assert torch.equal(merged.bias, ref_model.up.bias.detach())
    assert set(target_layers(model)) == set()  # nothing left to split


def test_single_group_leaves_the_layer_alone():
    model = Mlp()
    split_activations(model, calibration(), num_clusters=1, modules_to_not_convert=[])
    assert not any(isinstance(m, ChannelSplitLinear) for m in model.modules())


def test_channel_groups_skip_empty_clusters():
    groups = channel_groups(torch.tensor([1.0, 1.0, 1.0, 5.0]), 3)
    assert [g.tolist() for g in groups] == [[0, 1, 2], [3]]


def test_errors():
    with pytest.raises(ValueError, match="no batch"):
        split_activations(Mlp(), [])
    with pytest.raises(ValueError, match="num_clusters"):
        split_activations(Mlp(), calibration(), num_clusters=0)
    with pytest.raises(ValueError, match="partition"):
        ChannelSplitLinear.from_linear(nn.Linear(4, 2), [torch.tensor([0, 1]), torch.tensor([1, 2, 3])])
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        ChannelSplitLinear.from_linear(nn.Conv2d(4, 2, 1), [torch.arange(4)])
