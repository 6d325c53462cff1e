"""``ChannelSplitLinear``: a linear layer whose *input activation* is split into channel groups.

``y = W x + b = sum_g W[:, idx_g] x[..., idx_g] + b``: the input channels are partitioned into
groups ``idx_0, idx_1, ...`` and each group feeds a column slice of the layer (only part 0 carries
the bias). In float the result is the original output up to summation order, with the same
multiply-adds. What it buys is one tensor per group at the layer input: a per-tensor activation
quantizer (ONNX Runtime's static or dynamic INT8) then gives every group its own scale, so a few
outlier channels no longer stretch the range of all the others. The groups are chosen by
:func:`optimum_splitquant.activation_split.split_activations` from calibrated channel ranges.

Buffers and submodules (names as in ``state_dict``; ``G`` groups, ``n_g`` channels in group ``g``):
``index_{g}`` int64 ``(n_g,)`` input channels of group ``g``; ``parts.{g}`` an ``nn.Linear``
``(n_g -> out_features)`` or a :class:`~optimum_splitquant.nn.SplitLinear` of such branches when
the layer was weight-split first (then both splits compose).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .branches import SplitLinear

__all__ = ["ChannelSplitLinear"]


class ChannelSplitLinear(nn.Module):
    """``nn.Linear`` (or ``SplitLinear``) computed as a sum over input-channel groups."""

    def __init__(self, parts: Sequence[nn.Module], groups: Sequence[torch.Tensor]) -> None:
        super().__init__()
        if len(parts) != len(groups) or not parts:
            raise ValueError(f"need one part per group, got {len(parts)} parts and {len(groups)} groups")
        self.parts = nn.ModuleList(parts)
        for g, idx in enumerate(groups):
            self.register_buffer(f"index_{g}", idx.to(torch.int64))

    @classmethod
    def from_linear(cls, layer: nn.Module, groups: Sequence[torch.Tensor]) -> ChannelSplitLinear:
        """Split ``layer``'s input channels into ``groups`` (a partition of ``range(in_features)``)."""
        if not isinstance(layer, (nn.Linear, SplitLinear)):
            raise TypeError(f"expected an nn.Linear or SplitLinear, got {type(layer).__name__}")
        seen = torch.cat([g.reshape(-1) for g in groups]).sort().values if groups else torch.empty(0)
        if not torch.equal(seen, torch.arange(layer.in_features)):
            raise ValueError(f"groups must partition the {layer.in_features} input channels exactly once")
        parts = [_column_slice(layer, g, keep_bias=(i == 0)) for i, g in enumerate(groups)]
        return cls(parts, groups)

    @property
    def groups(self) -> list[torch.Tensor]:
        return [getattr(self, f"index_{g}") for g in range(len(self.parts))]

    @property
    def in_features(self) -> int:
        return sum(int(g.numel()) for g in self.groups)

    @property
    def out_features(self) -> int:
        return self.parts[0].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for part, idx in zip(self.parts, self.groups, strict=True):
            y = part(x.index_select(-1, idx))
            out = y if out is None else out + y
        return out

    def merge(self) -> nn.Module:
        """The single layer again: ``nn.Linear``, or ``SplitLinear`` when the parts were split (exact)."""
        first = self.parts[0]
        if isinstance(first, SplitLinear):
            branches = [
                _merge_columns([p.branches[j] for p in self.parts], self.groups) for j in range(first.num_clusters)
            ]
            return SplitLinear(branches)
        return _merge_columns(list(self.parts), self.groups)


def _column_slice(layer: nn.Module, idx: torch.Tensor, keep_bias: bool) -> nn.Module:
    if isinstance(layer, SplitLinear):
        return SplitLinear([_column_slice(b, idx, keep_bias) for b in layer.branches])
    weight = layer.weight.detach()
    has_bias = keep_bias and layer.bias is not None
    part = nn.Linear(int(idx.numel()), layer.out_features, bias=has_bias, device="meta")
    part.weight = nn.Parameter(weight[:, idx.to(weight.device)].clone(), requires_grad=False)
    if has_bias:
        part.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return part


def _merge_columns(parts: list[nn.Linear], groups: list[torch.Tensor]) -> nn.Linear:
    in_f = sum(int(g.numel()) for g in groups)
    first = parts[0]
    weight = torch.zeros(first.out_features, in_f, dtype=first.weight.dtype, device=first.weight.device)
    for part, idx in zip(parts, groups, strict=True):
        weight[:, idx] = part.weight.detach()
    merged = nn.Linear(in_f, first.out_features, bias=first.bias is not None, device="meta")
    merged.weight = nn.Parameter(weight, requires_grad=False)
    if first.bias is not None:
        merged.bias = nn.Parameter(first.bias.detach().clone(), requires_grad=False)
    return merged
