"""Explicit split float modules: assembly from cluster ids, summed forward, exact merge, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from optimum_splitquant.nn import SplitBranches, SplitConv1D, SplitConv2d, SplitLinear


def _ids(shape: tuple[int, ...], k: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, k, shape, generator=torch.Generator().manual_seed(seed))


def make(kind: str, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(12, 7, bias=bias)
    elif kind == "conv1d":
        layer = Conv1D(7, 12)
    else:
        layer = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


SPLIT = {"linear": SplitLinear, "conv1d": SplitConv1D, "conv2d": SplitConv2d}


def make_input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 5, 5, generator=g) if kind == "conv2d" else torch.randn(3, 2, 12, generator=g)


# transformers' Conv1D always has a bias
CASES = [("linear", True), ("linear", False), ("conv1d", True), ("conv2d", True), ("conv2d", False)]


@pytest.mark.parametrize(("kind", "bias"), CASES, ids=[f"{k}-{'bias' if b else 'no-bias'}" for k, b in CASES])
def test_from_ids_branches_sum_exactly_and_forward_matches(kind: str, bias: bool) -> None:
    layer = make(kind, bias)
    k = 3
    w_ids = _ids(tuple(layer.weight.shape), k)
    b_ids = None if layer.bias is None else _ids(tuple(layer.bias.shape), k, seed=2)
    split = SPLIT[kind].from_ids(layer, w_ids, b_ids, k)
    assert split.num_clusters == k and len(split.branches) == k
    assert all(type(b) is type(layer) for b in split.branches)
    for j, branch in enumerate(split.branches):
        # branch j holds exactly the weights of cluster j, exact zeros elsewhere
        assert torch.equal(branch.weight, torch.where(w_ids == j, layer.weight.detach(), torch.zeros(())))
        if b_ids is not None:
            assert torch.equal(branch.bias, torch.where(b_ids == j, layer.bias.detach(), torch.zeros(())))
    assert torch.equal(split.weight, layer.weight.detach())
    if layer.bias is None:
        assert split.bias is None
    else:
        assert torch.equal(split.bias, layer.bias.detach())
    x = make_input(kind)
    with torch.no_grad():
        expected, out = layer(x), split(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(split.cluster_ids(), w_ids)


@pytest.mark.parametrize("kind", list(SPLIT))
def test_merge_is_exact_and_keeps_the_type(kind: str) -> None:
    layer = make(kind)
    split = SPLIT[kind].from_ids(layer, _ids(tuple(layer.weight.shape), 3), _ids(tuple(layer.bias.shape), 3), 3)
    merged = split.merge()
    assert type(merged) is type(layer)
    assert torch.equal(merged.weight, layer.weight) and torch.equal(merged.bias, layer.bias)
    x = make_input(kind)
    with torch.no_grad():
        assert torch.equal(merged(x), layer(x))


def test_state_dict_names_and_attributes() -> None:
    layer = make("conv2d")
    split = SplitConv2d.from_ids(layer, _ids((6, 4, 3, 3), 3), _ids((6,), 3), 3)
    assert set(split.state_dict()) == {f"branches.{j}.{t}" for j in range(3) for t in ("weight", "bias")}
    assert (split.in_channels, split.out_channels, split.kernel_size, split.groups) == (4, 6, (3, 3), 1)
    lin = SplitLinear.from_ids(make("linear"), _ids((7, 12), 2), _ids((7,), 2), 2)
    assert (lin.in_features, lin.out_features, lin.num_clusters) == (12, 7, 2)
    c1 = SplitConv1D.from_ids(make("conv1d"), _ids((12, 7), 3), _ids((7,), 3), 3)
    assert (c1.nx, c1.nf) == (12, 7)


def test_requires_grad_follows_the_original() -> None:
    layer = make("linear")
    split = SplitLinear.from_ids(layer, _ids((7, 12), 3), _ids((7,), 3), 3)
    assert all(p.requires_grad for p in split.parameters())
    layer.requires_grad_(False)
    split = SplitLinear.from_ids(layer, _ids((7, 12), 3), _ids((7,), 3), 3)
    assert not any(p.requires_grad for p in split.parameters())


def test_empty_cluster_gives_an_all_zero_branch() -> None:
    layer = make("linear")
    ids = torch.zeros(7, 12, dtype=torch.long)  # everything in cluster 0
    split = SplitLinear.from_ids(layer, ids, torch.zeros(7, dtype=torch.long), 3)
    assert torch.count_nonzero(split.branches[1].weight) == 0 and torch.count_nonzero(split.branches[2].weight) == 0
    assert torch.equal(split.branches[0].weight, layer.weight.detach())


def test_errors() -> None:
    layer = make("linear")
    with pytest.raises(TypeError, match="splits a Conv2d, got Linear"):
        SplitConv2d.from_ids(layer, _ids((7, 12), 3), _ids((7,), 3), 3)
    with pytest.raises(ValueError, match="weight_ids"):
        SplitLinear.from_ids(layer, _ids((12, 7), 3), _ids((7,), 3), 3)
    with pytest.raises(ValueError, match="bias_ids"):
        SplitLinear.from_ids(layer, _ids((7, 12), 3), None, 3)
    with pytest.raises(TypeError, match="branches must be Linear"):
        SplitLinear([nn.Conv2d(1, 1, 1)])
    with pytest.raises(ValueError, match="at least one"):
        SplitLinear([])
    with pytest.raises(NotImplementedError):
        SplitBranches.layer_type()
