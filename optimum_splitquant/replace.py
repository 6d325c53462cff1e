"""Finding the layers SplitQuant replaces in a transformers model, and swapping them in and out.

Eligible layers are ``nn.Linear``, transformers' GPT-2 style ``Conv1D`` and ``nn.Conv2d``
(quantized as :class:`~optimum_splitquant.nn.SplitQuantConv2d`, one row per output kernel). The default head
policy keeps in float: every module whose weight is tied to another (tied output embeddings),
the output embeddings, the model's ``_keep_in_fp32_modules`` and the last eligible layer of the
model (the task head: ``classifier``, ``score``, ``lm_head``, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module

from .core.spec import QuantSpec
from .nn.conv import SplitQuantConv2d
from .nn.linear import SplitQuantLinear

__all__ = [
    "dequantize_model",
    "eligible_layers",
    "layer_dims",
    "quantized_from_float",
    "replace_layers",
    "resolve_modules_to_not_convert",
    "set_submodule",
]

logger = logging.getLogger(__name__)


ELIGIBLE_TYPES = (nn.Linear, Conv1D, nn.Conv2d)


def eligible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``Conv1D`` / ``nn.Conv2d`` of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ELIGIBLE_TYPES) and name}


def layer_dims(module: nn.Module) -> tuple[int, int, str]:
    """``(in_features, out_features, source)`` of an eligible float layer, its weight seen as ``(out, in)`` rows.

    For ``nn.Conv2d`` ``in_features`` is the flattened kernel width ``in_channels / groups * kh * kw``.
    """
    if isinstance(module, Conv1D):
        return module.nx, module.nf, "conv1d"
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw, module.out_channels, "conv2d"
    return module.in_features, module.out_features, "linear"


def quantized_from_float(module: nn.Module, spec: QuantSpec, ids: torch.Tensor | None = None) -> SplitQuantLinear:
    """Quantize one eligible float layer into ``SplitQuantLinear`` (or ``SplitQuantConv2d`` for ``nn.Conv2d``)."""
    _, _, source = layer_dims(module)
    if source == "conv2d":
        return SplitQuantConv2d.from_float(module, spec, ids=ids)
    return SplitQuantLinear.from_float(module, spec, source=source, ids=ids)


def resolve_modules_to_not_convert(model: nn.Module, requested: Iterable[str] | None) -> list[str]:
    """Names of eligible layers kept in float: ``requested`` patterns, or the default head policy if None.

    Layers whose weight is tied to another parameter are always kept (a shared weight cannot be
    replaced by compact tensors in one place only).
    """
    layers = eligible_layers(model)
    forced = set(_tied_modules(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or [])
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
    kept = sorted(name for name in layers if not should_convert_module(name, sorted(patterns)))
    return kept


def replace_layers(
    model: nn.Module,
    spec: QuantSpec,
    names: Iterable[str],
    *,
    float_weight: bool,
) -> list[str]:
    """Replace the named eligible layers by ``SplitQuantLinear`` / ``SplitQuantConv2d`` on the meta device.

    Returns the names replaced.
    """
    layers = eligible_layers(model)
    replaced = []
    for name in names:
        module = layers[name]
        in_f, out_f, source = layer_dims(module)
        try:
            with torch.device("meta"):
                if source == "conv2d":
                    new = SplitQuantConv2d(
                        module.in_channels,
                        module.out_channels,
                        module.kernel_size,
                        module.stride,
                        module.padding,
                        module.dilation,
                        module.groups,
                        module.bias is not None,
                        module.padding_mode,
                        spec=spec,
                        float_weight=float_weight,
                        dtype=module.weight.dtype,
                    )
                else:
                    new = SplitQuantLinear(
                        in_f,
                        out_f,
                        module.bias is not None,
                        spec=spec,
                        source=source,
                        float_weight=float_weight,
                        dtype=module.weight.dtype,
                    )
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        set_submodule(model, name, new)
        replaced.append(name)
    return replaced


def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every ``SplitQuantLinear`` / ``SplitQuantConv2d`` by the float layer type it replaced, in place.

    ``dtype`` may be a name (``"float32"``): transformers passes ``model.config.dtype``, a string
    for some configs.
    """
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved
    for name, module in list(model.named_modules()):
        if not isinstance(module, SplitQuantLinear):
            continue
        linear = module.dequantize(dtype)
        if module.source == "conv1d":
            conv = Conv1D(module.out_features, module.in_features)
            conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
            with torch.no_grad():
                conv.weight.copy_(linear.weight.t())
                conv.bias.copy_(linear.bias)
            linear = conv
        set_submodule(model, name, linear)
    return model


def _tied_modules(model: nn.Module) -> list[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys = set(tied.keys()) | set(tied.values())
    return [k.rsplit(".", 1)[0] for k in keys if "." in k]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
