"""Matrix views: how each float layer type's weight maps onto ``(rows, width)``, and its float twin.

Every quantized layer stores its weight as ``rows`` output channels of ``width`` weights each
(``out_features`` by ``in_features`` in :class:`~.compact.SplitQuantModule`). A view is the one
place that says, for one float layer type, how its weight becomes those rows and back, and which
float layer holds a dequantized copy:

=========  =====================  =========================  ===========================  ==========================
view       float layer (twin)     float weight shape         ``rows(weight)``             ``(rows, width)``
=========  =====================  =========================  ===========================  ==========================
linear     ``nn.Linear``          ``(out, in)``              the weight itself            ``(out, in)``
conv1d     transformers' Conv1D   ``(in, out)``              its transpose                ``(out, in)``
conv2d     ``nn.Conv2d``          ``(out, in / g, kh, kw)``  ``weight.reshape(out, -1)``  ``(out, in / g * kh * kw)``
=========  =====================  =========================  ===========================  ==========================

The quantized modules (:mod:`.linear`, :mod:`.conv`) and the table of layer kinds
(:mod:`optimum_splitquant.layers`) both read these views. transformers is imported only when a
``Conv1D`` twin is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["VIEWS", "MatrixView", "conv2d_settings"]


def conv2d_settings(module: nn.Module) -> dict[str, Any]:
    """The geometry of a Conv2d-like ``module`` as ``nn.Conv2d`` keyword arguments (bias excluded)."""
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": module.kernel_size,
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
        "padding_mode": module.padding_mode,
    }


class MatrixView:
    """The ``linear`` view (``nn.Linear``): the float weight is already ``(rows, width)``.

    Subclasses override what differs for their layer type. ``layer`` arguments are quantized
    layers (they carry ``in_features``, ``out_features``, ``bias`` and, for Conv2d, the
    convolution settings).
    """

    name = "linear"

    def dims(self, weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
        """``(rows, width)`` of a float weight of ``weight_shape`` (no data read: meta weights work)."""
        return weight_shape[0], math.prod(weight_shape[1:])

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A float weight in this layout as ``(rows, width)`` (a view where possible)."""
        return weight.reshape(weight.shape[0], -1)

    def from_rows(self, rows: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Inverse of :meth:`rows` for a float weight of ``shape``."""
        return rows.reshape(shape)

    def float_shape(self, layer: nn.Module) -> tuple[int, ...]:
        """Shape of the float weight of the layer that ``layer`` replaced."""
        return (layer.out_features, layer.in_features)

    def empty_float(
        self, layer: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """An uninitialised float twin of ``layer``: the layer type and geometry it replaced."""
        bias = layer.bias is not None
        return nn.Linear(layer.in_features, layer.out_features, bias=bias, device=device, dtype=dtype)


class _Conv1DView(MatrixView):
    """GPT-2's ``Conv1D``: the weight is stored ``(in, out)``; its rows are the transpose."""

    name = "conv1d"

    def dims(self, weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
        return weight_shape[1], weight_shape[0]

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()

    def from_rows(self, rows: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return rows.t()

    def float_shape(self, layer: nn.Module) -> tuple[int, ...]:
        return (layer.in_features, layer.out_features)

    def empty_float(
        self, layer: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """A ``Conv1D`` (it always has a bias: zeros when ``layer`` has none)."""
        from transformers.pytorch_utils import Conv1D  # lazy: nn/ does not import transformers at import time

        with torch.device(device or "cpu"):
            conv = Conv1D(layer.out_features, layer.in_features)
        return conv if dtype is None else conv.to(dtype)


class _Conv2dView(MatrixView):
    """``nn.Conv2d``: one row per output kernel, flattened in ``weight.reshape(out, -1)`` order."""

    name = "conv2d"

    def float_shape(self, layer: nn.Module) -> tuple[int, ...]:
        return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)

    def empty_float(
        self, layer: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        bias = layer.bias is not None
        return nn.Conv2d(**conv2d_settings(layer), bias=bias, device=device, dtype=dtype)


VIEWS: dict[str, MatrixView] = {view.name: view for view in (MatrixView(), _Conv1DView(), _Conv2dView())}
"""The view of each layer kind, by name (``"linear"``, ``"conv1d"``, ``"conv2d"``)."""
