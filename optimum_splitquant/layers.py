"""The one table of layer kinds SplitQuant handles, and the model walks built on it.

=========  ======================  ===========================================  ===========================  ===============
kind       float layer             quantized as                                 one row of the matrix view   paper's k-means
=========  ======================  ===========================================  ===========================  ===============
linear     ``nn.Linear``           :class:`SplitQuantLinear` (source linear)    one output feature           per tensor
conv1d     transformers' Conv1D    :class:`SplitQuantLinear` (source conv1d)    one output feature           per tensor
conv2d     ``nn.Conv2d``           :class:`SplitQuantConv2d`                    one flattened output kernel  per kernel
=========  ======================  ===========================================  ===========================  ===============

GPT-2's ``Conv1D`` stores its weight ``(in, out)``; every kind is quantized as rows of output
channels. How each kind's weight maps onto those rows, and its float twin, is written once in
:mod:`optimum_splitquant.nn.geometry` (read by this table and by the quantized modules alike). Each
kind also names its explicit split float form (:mod:`optimum_splitquant.nn.branches`).

The default head policy keeps in float: every module whose weight is tied to another (tied output
embeddings), the output embeddings, the model's ``_keep_in_fp32_modules`` and the last eligible
layer of the model (the task head: ``classifier``, ``score``, ``lm_head``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module

from .core.spec import QuantSpec
from .nn.branches import SplitBranches, SplitConv1D, SplitConv2d, SplitLinear
from .nn.compact import SplitQuantModule
from .nn.conv import SplitQuantConv2d
from .nn.geometry import VIEWS, MatrixView, conv2d_settings
from .nn.linear import SplitQuantLinear

__all__ = [
    "KINDS",
    "LayerKind",
    "dequantize_model",
    "eligible_layers",
    "float_layer_kind",
    "layer_kind",
    "quantize_layer",
    "replace_layers",
    "resolve_modules_to_not_convert",
    "set_submodule",
    "tied_parameter_keys",
]


@dataclass(frozen=True)
class LayerKind:
    """One float layer type: its matrix view (:mod:`optimum_splitquant.nn.geometry`), quantized and split forms."""

    name: str
    float_type: type[nn.Module]
    split_type: type[SplitBranches]
    paper_clustering: str

    @property
    def view(self) -> MatrixView:
        """How this kind's float weight maps onto rows, and its float twin."""
        return VIEWS[self.name]

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """``(rows, width)`` of ``module``'s weight seen as a matrix (float or quantized module)."""
        if isinstance(module, SplitQuantModule):
            return module.out_features, module.in_features
        return self.view.dims(module.weight.shape)  # the shape only: meta weights work

    def describe(self, module: nn.Module) -> str:
        """The layer as an error message names it."""
        rows, width = self.dims(module)
        if self.name == "conv2d":
            return (
                f"Conv2d({module.in_channels}, {module.out_channels}, kernel_size={tuple(module.kernel_size)}, "
                f"groups={module.groups}): {rows} kernels of {width} weights"
            )
        return f"{type(module).__name__}({width} -> {rows})"

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A float weight in this kind's layout as ``(rows, width)``."""
        return self.view.rows(weight)

    def from_rows(self, rows: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Inverse of :meth:`rows` for a weight of ``shape``."""
        return self.view.from_rows(rows, shape)

    def build(
        self,
        module: nn.Module,
        spec: QuantSpec,
        *,
        float_weight: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SplitQuantModule:
        """An empty quantized layer shaped like the float ``module`` (on ``device``, else the default one)."""
        bias = getattr(module, "bias", None) is not None
        settings = {"bias": bias, "spec": spec, "float_weight": float_weight, "device": device, "dtype": dtype}
        if self.name == "conv2d":
            return SplitQuantConv2d(**conv2d_settings(module), **settings)
        rows, width = self.dims(module)
        return SplitQuantLinear(width, rows, source=self.name, **settings)

    def quantize(self, module: nn.Module, spec: QuantSpec, ids: torch.Tensor | None = None) -> SplitQuantModule:
        """Quantize the float ``module``; ``ids`` (shape ``(rows, width)``) overrides the clustering."""
        if self.name == "conv2d":
            return SplitQuantConv2d.from_float(module, spec, ids=ids)
        return SplitQuantLinear.from_float(module, spec, source=self.name, ids=ids)

    def empty_float(
        self, layer: SplitQuantModule, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """An uninitialised float layer of the type and geometry that ``layer`` replaced."""
        return self.view.empty_float(layer, device, dtype)

    def to_float(self, layer: SplitQuantModule, dtype: torch.dtype | None = None) -> nn.Module:
        """The float layer type ``layer`` replaced, holding its dequantized weight and float bias."""
        return layer.dequantize(dtype)


KINDS = (
    LayerKind("linear", nn.Linear, SplitLinear, "tensor"),
    LayerKind("conv1d", Conv1D, SplitConv1D, "tensor"),
    LayerKind("conv2d", nn.Conv2d, SplitConv2d, "channel"),
)
_BY_NAME = {kind.name: kind for kind in KINDS}


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a float layer or of a quantized one (``None`` for anything else)."""
    if isinstance(module, SplitQuantModule):
        return _BY_NAME[module.source]
    return next((kind for kind in KINDS if isinstance(module, kind.float_type)), None)


def eligible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every float layer of a known kind in ``model``, by qualified name, in module order."""
    types = tuple(kind.float_type for kind in KINDS)
    return {name: m for name, m in model.named_modules() if isinstance(m, types) and name}


def quantize_layer(module: nn.Module, spec: QuantSpec, ids: torch.Tensor | None = None) -> SplitQuantModule:
    """Quantize one eligible float layer into its SplitQuant form."""
    return float_layer_kind(module, "quantize").quantize(module, spec, ids)


def float_layer_kind(module: nn.Module, action: str) -> LayerKind:
    """The kind of a float layer; ``TypeError`` naming ``action`` for anything else (quantized layers too)."""
    kind = layer_kind(module)
    if kind is None or isinstance(module, SplitQuantModule):
        raise TypeError(f"cannot {action} a {type(module).__name__}: not a Linear/Conv1D/Conv2d layer")
    return kind


def resolve_modules_to_not_convert(model: nn.Module, requested: Iterable[str] | None) -> list[str]:
    """Names of eligible layers kept in float: ``requested`` patterns, or the default head policy if None.

    Layers whose weight is tied to another parameter are always kept (a shared weight cannot be
    replaced by compact tensors in one place only).
    """
    layers = eligible_layers(model)
    tied = [k.rsplit(".", 1)[0] for k in tied_parameter_keys(model) if "." in k]
    forced = set(tied) | set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if requested is None:
        patterns = set(forced)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in layers.items():
            if module is out_emb:
                patterns.add(name)
        if layers:
            patterns.add(next(reversed(layers)))
    else:
        patterns = set(requested) | forced
    return sorted(name for name in layers if not should_convert_module(name, sorted(patterns)))


def replace_layers(model: nn.Module, spec: QuantSpec, names: Iterable[str], *, float_weight: bool) -> list[str]:
    """Replace the named eligible layers by empty SplitQuant layers on the meta device; returns the names."""
    layers = eligible_layers(model)
    replaced = []
    for name in names:
        module = layers[name]
        try:
            new = layer_kind(module).build(
                module, spec, float_weight=float_weight, device="meta", dtype=module.weight.dtype
            )
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        set_submodule(model, name, new)
        replaced.append(name)
    return replaced


def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every SplitQuant layer by the float layer type it replaced, in place.

    ``dtype`` may be a name (``"float32"``): transformers passes ``model.config.dtype``, a string
    for some configs.
    """
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved
    for name, module in list(model.named_modules()):
        if isinstance(module, SplitQuantModule):
            set_submodule(model, name, layer_kind(module).to_float(module, dtype))
    return model


def tied_parameter_keys(model: nn.Module) -> set[str]:
    """Qualified names of the parameters tied to another one (both sides of each tie)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied.keys()) | set(tied.values())


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
