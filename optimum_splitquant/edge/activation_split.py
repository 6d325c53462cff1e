"""Activation splitting for per-tensor activation quantizers: input channels grouped by calibrated range.

SplitQuant narrows *weight* ranges by splitting values into k-means clusters. Activations cannot
be split by value once for all (their values change with every input), but their **channels**
can: in a transformer a few hidden channels carry most of the range of the tensor that feeds a
linear layer (all-MiniLM-L6-v2: one GELU output channel reaches 24.6 while the median channel
stays under 1.5). :func:`split_activations` measures each input channel's range on calibration
data, clusters the ranges with the same 1-D k-means as the weights (k = 3), and rewrites each
linear layer as a sum over the channel groups
(:class:`~optimum_splitquant.nn.channel_split.ChannelSplitLinear`). The model computes the same
function with the same multiply-adds; a per-tensor activation quantizer then gives every group its
own scale. It composes with the weight split of :func:`~optimum_splitquant.split_model`.

The reference code's "activation splitting" (cut the channels into three contiguous chunks, apply
the same activation function to each, concatenate) changes nothing: the concatenation is one
tensor again, quantized with one scale.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..core.kmeans import assign_clusters, kmeans_1d
from ..core.spec import check_num_clusters
from ..layers import resolve_modules_to_not_convert, set_submodule
from ..nn.branches import SplitLinear
from ..nn.channel_split import ChannelSplitLinear

__all__ = ["channel_groups", "input_channel_ranges", "split_activations", "target_layers"]

logger = logging.getLogger(__name__)


def target_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and ``SplitLinear`` of ``model`` that is not part of a split or channel-split layer."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (SplitLinear, ChannelSplitLinear)):
            inside.append(name)
            if isinstance(module, SplitLinear):
                out[name] = module
        elif isinstance(module, nn.Linear):
            out[name] = module
    return out


@torch.no_grad()
def input_channel_ranges(
    model: nn.Module, calibration: Iterable[Mapping[str, torch.Tensor]], names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Per input channel, the largest ``|x|`` each named layer sees over ``model(**batch)`` for every batch."""
    names = list(names)
    ranges: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            ranges[name] = amax if name not in ranges else torch.maximum(ranges[name], amax)

        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        batches = 0
        for batch in calibration:
            model(**batch)
            batches += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("calibration yielded no batch")
    missing = [n for n in names if n not in ranges]
    if missing:
        raise ValueError(f"calibration never ran these layers: {missing[:5]}")
    return ranges


def channel_groups(ranges: torch.Tensor, num_clusters: int = 3) -> list[torch.Tensor]:
    """Partition channels by 1-D k-means of their ranges; non-empty groups, smallest ranges first."""
    values = ranges.reshape(1, -1).to(torch.float64)
    ids = assign_clusters(values, kmeans_1d(values, num_clusters).boundaries).reshape(-1)
    return [torch.nonzero(ids == j).reshape(-1) for j in range(num_clusters) if bool((ids == j).any())]


def split_activations(
    model: nn.Module,
    calibration: Iterable[Mapping[str, torch.Tensor]],
    num_clusters: int = 3,
    modules_to_not_convert: Iterable[str] | None = None,
) -> nn.Module:
    """Split the input channels of every linear layer into ``num_clusters`` range groups, **in place**.

    Args:
        model: a float model, split by :func:`~optimum_splitquant.split_model` or not.
        calibration: batches of keyword inputs (``model(**batch)``), e.g. tokenized real sentences:
            the same kind of data the downstream activation quantizer is calibrated on.
        num_clusters: channel groups per layer (k of the k-means over channel ranges).
        modules_to_not_convert: layer names left alone; ``None`` leaves the layers that
            ``split_model``'s default head policy keeps (the task head, tied output embeddings).

    Returns:
        The same model; layers whose channels all fall in one group are left as they were.
    """
    check_num_clusters(num_clusters)
    targets = target_layers(model)
    if modules_to_not_convert is None:
        kept = {n.split(".branches.")[0] for n in resolve_modules_to_not_convert(model, None)}
    else:
        kept = set(modules_to_not_convert)
    names = [n for n in targets if n not in kept]
    ranges = input_channel_ranges(model, calibration, names)
    split = 0
    for name in names:
        groups = channel_groups(ranges[name], num_clusters)
        if len(groups) < 2:
            continue
        set_submodule(model, name, ChannelSplitLinear.from_linear(targets[name], groups))
        split += 1
    logger.info(
        "activation split: %d of %d linear layers now read their input in up to %d channel groups (%d kept: %s)",
        split,
        len(targets),
        num_clusters,
        len(targets) - len(names),
        ", ".join(sorted(set(targets) - set(names))) or "none",
    )
    return model
