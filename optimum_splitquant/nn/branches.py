"""Explicit split float layers: ``num_clusters`` branches of the original layer type, outputs summed.

This is the paper's form of a split layer. Branch ``j`` is a plain ``nn.Linear`` / ``Conv1D`` /
``nn.Conv2d`` holding the weights (and bias values) of cluster ``j`` and exact zeros elsewhere,
so the branches have disjoint supports, ``sum(branch.weight) == original.weight`` exactly, and
``forward(x) = branches[0](x) + branches[1](x) + ...`` equals the original layer up to float
rounding of the sum. Any downstream quantizer (optimum-quanto, ONNX Runtime, an edge toolchain)
then sees ``num_clusters`` ordinary layers and gives each its own scale.

Parameters (names as in ``state_dict``; ``j`` in ``0 .. num_clusters - 1``, lower cluster first):
``branches.{j}.weight`` with the original layer's weight shape and dtype, and
``branches.{j}.bias`` when the original has a bias. The modules are built from cluster ids by
:func:`optimum_splitquant.split_model`; this file only assembles and merges them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .geometry import conv2d_settings

__all__ = ["SplitBranches", "SplitConv1D", "SplitConv2d", "SplitLinear"]


class SplitBranches(nn.Module):
    """Base class: ``num_clusters`` float branches of one layer type whose outputs are summed."""

    def __init__(self, branches: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(branches) < 1:
            raise ValueError("a split layer needs at least one branch")
        layer_type = self.layer_type()
        for b in branches:
            if type(b) is not layer_type:
                raise TypeError(f"{type(self).__name__} branches must be {layer_type.__name__}, got {type(b).__name__}")
        self.branches = nn.ModuleList(branches)

    @classmethod
    def layer_type(cls) -> type[nn.Module]:
        """The float layer type this class splits (and its branches' type)."""
        raise NotImplementedError

    @classmethod
    def from_ids(
        cls, layer: nn.Module, weight_ids: torch.Tensor, bias_ids: torch.Tensor | None, num_clusters: int
    ) -> SplitBranches:
        """Split ``layer``: branch ``j`` keeps the weights where ``weight_ids == j`` and the biases where ``bias_ids == j``.

        ``weight_ids`` has the shape of ``layer.weight`` and ``bias_ids`` that of ``layer.bias``
        (``None`` when the layer has no bias).
        """
        if type(layer) is not cls.layer_type():
            raise TypeError(f"{cls.__name__} splits a {cls.layer_type().__name__}, got {type(layer).__name__}")
        weight = layer.weight.detach()
        bias = None if layer.bias is None else layer.bias.detach()
        if tuple(weight_ids.shape) != tuple(weight.shape):
            raise ValueError(f"weight_ids has shape {tuple(weight_ids.shape)}, the weight {tuple(weight.shape)}")
        if bias is not None and (bias_ids is None or tuple(bias_ids.shape) != tuple(bias.shape)):
            raise ValueError(f"bias_ids must have the bias shape {tuple(bias.shape)}")
        branches = []
        for j in range(num_clusters):
            w = torch.where(weight_ids.to(weight.device) == j, weight, torch.zeros((), dtype=weight.dtype))
            b = (
                None
                if bias is None
                else torch.where(bias_ids.to(bias.device) == j, bias, torch.zeros((), dtype=bias.dtype))
            )
            branches.append(cls._branch_like(layer, w, b))
        result = cls(branches)
        result.requires_grad_(layer.weight.requires_grad)
        return result

    @classmethod
    def from_branch_weights(
        cls, layer: nn.Module, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None
    ) -> SplitBranches:
        """Build from explicit per-branch tensors (in ``layer``'s weight layout); ``layer`` gives the config only."""
        if biases is not None and len(biases) != len(weights):
            raise ValueError(f"got {len(weights)} branch weights but {len(biases)} branch biases")
        return cls([cls._branch_like(layer, w, None if biases is None else biases[j]) for j, w in enumerate(weights)])

    @classmethod
    def _branch_like(cls, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        raise NotImplementedError

    @property
    def num_clusters(self) -> int:
        return len(self.branches)

    @property
    def weight(self) -> torch.Tensor:
        """Sum of the branch weights (the original weight; a new tensor, writing into it changes nothing)."""
        return _sum(b.weight.detach() for b in self.branches)

    @property
    def bias(self) -> torch.Tensor | None:
        """Sum of the branch biases (the original bias), or ``None``."""
        if self.branches[0].bias is None:
            return None
        return _sum(b.bias.detach() for b in self.branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out

    def merge(self) -> nn.Module:
        """The single original-type layer (weights and biases summed: exact, the supports are disjoint)."""
        return self._branch_like(self.branches[0], self.weight, self.bias)

    def cluster_ids(self) -> torch.Tensor:
        """Per weight, the index of the branch holding it (int64, weight layout); exact zeros read as branch 0."""
        ids = torch.zeros(self.branches[0].weight.shape, dtype=torch.int64, device=self.branches[0].weight.device)
        for j, b in enumerate(self.branches):
            ids[b.weight.detach() != 0] = j
        return ids


class SplitLinear(SplitBranches):
    """``nn.Linear`` split into ``num_clusters`` ``nn.Linear`` branches (outputs summed)."""

    @classmethod
    def layer_type(cls) -> type[nn.Module]:
        return nn.Linear

    @property
    def in_features(self) -> int:
        return self.branches[0].in_features

    @property
    def out_features(self) -> int:
        return self.branches[0].out_features

    @classmethod
    def _branch_like(cls, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
        branch = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
        return _fill(branch, weight, bias)


class SplitConv1D(SplitBranches):
    """transformers' ``Conv1D`` (weight ``(in, out)``) split into ``Conv1D`` branches (outputs summed)."""

    @classmethod
    def layer_type(cls) -> type[nn.Module]:
        from transformers.pytorch_utils import Conv1D  # lazy: nn/ does not import transformers at import time

        return Conv1D

    @property
    def nf(self) -> int:
        return self.branches[0].nf

    @property
    def nx(self) -> int:
        return self.branches[0].nx

    @classmethod
    def _branch_like(cls, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        with torch.device("meta"):
            branch = cls.layer_type()(layer.nf, layer.nx)
        if bias is None:  # Conv1D always has a bias; a bias-free branch keeps exact zeros
            bias = torch.zeros(layer.nf, dtype=weight.dtype, device=weight.device)
        return _fill(branch, weight, bias)


class SplitConv2d(SplitBranches):
    """``nn.Conv2d`` split into ``nn.Conv2d`` branches of the same geometry (outputs summed)."""

    @classmethod
    def layer_type(cls) -> type[nn.Module]:
        return nn.Conv2d

    @property
    def in_channels(self) -> int:
        return self.branches[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.branches[0].out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.branches[0].kernel_size

    @property
    def groups(self) -> int:
        return self.branches[0].groups

    @classmethod
    def _branch_like(cls, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
        branch = nn.Conv2d(**conv2d_settings(layer), bias=bias is not None, device="meta")
        return _fill(branch, weight, bias)


def _fill(branch: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """Give a meta-built branch real parameters (copies; inference-only until ``requires_grad_`` says otherwise)."""
    branch.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        branch.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return branch


def _sum(tensors) -> torch.Tensor:
    it = iter(tensors)
    total = next(it).clone()
    for t in it:
        total += t
    return total
