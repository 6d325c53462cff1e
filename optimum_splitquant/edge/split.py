"""The paper's face: split a float model into explicit branch layers, ready for any downstream quantizer.

:func:`split_model` replaces every target layer (``nn.Linear``, transformers' ``Conv1D``,
``nn.Conv2d``) by a :class:`~optimum_splitquant.nn.SplitBranches` module whose ``num_clusters``
branches hold disjoint parts of the weight and bias, outputs summed. Clustering semantics
(those of the paper's reference code, made deterministic):

* **weights** are clustered by the same 1-D k-means as the quantizer
  (:func:`optimum_splitquant.core.cluster_ids`), on the weight seen as ``(out, in)`` rows
  (``Conv1D`` transposed, ``Conv2d`` as ``(out_channels, in_channels / groups * kh * kw)``):
  ``"tensor"`` = one k-means over the whole weight, ``"channel"`` = one per output row / kernel.
  The default ``clustering=None`` is the paper's: per tensor for Linear and Conv1D, per output
  kernel for Conv2d. A split model and a SplitQuant model with the same ``num_clusters`` and
  ``clustering`` therefore put every weight in the same cluster.
* **biases** are clustered separately, by their own 1-D k-means over the whole bias vector, and
  bias cluster ``j`` goes to branch ``j`` (lower biases with lower weights), as in the reference.
  An all-zero bias is split like any other (its branches are all zero); unlike the reference
  code, it never stops the weights from being split.

Branch ``j`` keeps cluster ``j``'s values and exact zeros elsewhere, so the branch weights sum to
the original exactly; outputs differ from the original only by float rounding of the sum.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.quantize import cluster_ids, split_branches
from ..core.spec import QuantSpec, check_num_clusters
from ..layers import (
    LayerKind,
    eligible_layers,
    float_layer_kind,
    layer_kind,
    resolve_modules_to_not_convert,
    set_submodule,
)
from ..nn.branches import SplitBranches
from ..nn.compact import SplitQuantModule

__all__ = [
    "SplitReport",
    "dequantize_to_split",
    "layer_cluster_ids",
    "merge_split",
    "split_layer",
    "split_model",
]

logger = logging.getLogger(__name__)

# Bits play no part in clustering; QuantSpec needs a valid value.
_ANY_BITS = 8


@dataclass
class SplitReport:
    """What :func:`split_model` did to each module that holds parameters.

    Attributes:
        num_clusters: branches per split layer.
        split: qualified name -> ``"<source> (<clustering>)"`` for every split layer.
        not_split: qualified name -> reason, for every other module owning parameters
            (embeddings, norms, the head, layers too small, unsupported layer types).
    """

    num_clusters: int
    split: dict[str, str] = field(default_factory=dict)
    not_split: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per reason, with the first names."""
        lines = [f"split {len(self.split)} layers into {self.num_clusters} branches each"]
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.not_split.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            lines.append(f"not split ({reason}): {shown}")
        return "\n".join(lines)


def _resolve_clustering(clustering: str | None, kind: LayerKind) -> str:
    return kind.paper_clustering if clustering is None else clustering


def _bias_ids(bias: torch.Tensor | None, num_clusters: int) -> torch.Tensor | None:
    if bias is None:
        return None
    spec = QuantSpec(bits=_ANY_BITS, num_clusters=num_clusters, clustering="tensor")
    return cluster_ids(bias.detach().reshape(1, -1), spec).reshape(bias.shape)


def layer_cluster_ids(
    layer: nn.Module, num_clusters: int = 3, clustering: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cluster ids (int64) of ``layer``'s weight (in its own layout) and bias (``None`` without one)."""
    kind = float_layer_kind(layer, "split")
    spec = QuantSpec(bits=_ANY_BITS, num_clusters=num_clusters, clustering=_resolve_clustering(clustering, kind))
    ids = cluster_ids(kind.rows(layer.weight.detach()), spec)
    return kind.from_rows(ids, layer.weight.shape), _bias_ids(getattr(layer, "bias", None), num_clusters)


def split_layer(layer: nn.Module, num_clusters: int = 3, clustering: str | None = None) -> SplitBranches:
    """Split one ``nn.Linear`` / ``Conv1D`` / ``nn.Conv2d`` into its explicit branch module."""
    kind = float_layer_kind(layer, "split")
    if layer.weight.is_meta:
        raise ValueError("cannot split a layer whose weight is on the meta device; load the weights first")
    weight_ids, bias_ids = layer_cluster_ids(layer, num_clusters, clustering)
    return kind.split_type.from_ids(layer, weight_ids, bias_ids, num_clusters)


def split_model(
    model: nn.Module,
    num_clusters: int = 3,
    clustering: str | None = None,
    modules_to_not_convert: Iterable[str] | None = None,
) -> nn.Module:
    """Split every target layer of ``model`` into ``num_clusters`` float branches, **in place**.

    Args:
        model: a float model (a transformers model or any ``nn.Module``).
        num_clusters: k of the 1-D k-means (3 in the paper).
        clustering: ``"tensor"``, ``"channel"`` (per output row / kernel), or ``None`` for the
            paper's choice (per tensor for Linear/Conv1D, per output kernel for Conv2d).
        modules_to_not_convert: name patterns kept unsplit; ``None`` applies the quantizer's
            default head policy (task head, output embeddings, tied weights stay unsplit).

    Returns:
        The same ``model``; ``model.split_report`` holds the :class:`SplitReport` (also logged).
    """
    check_num_clusters(num_clusters)
    if clustering not in (None, "tensor", "channel"):
        raise ValueError(f"clustering must be None, 'tensor' or 'channel', got {clustering!r}")
    if any(isinstance(m, SplitBranches) for m in model.modules()):
        raise ValueError("the model is already split; merge it with merge_split(model) before splitting again")
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            "the model is quantized; split its float original, or use dequantize_to_split(model) "
            "to get the split float form of a SplitQuant model"
        )
    requested = None if modules_to_not_convert is None else list(modules_to_not_convert)
    kept = set(resolve_modules_to_not_convert(model, requested))
    kept_reason = (
        "default head policy: task head, output embeddings, tied or fp32-kept weights"
        if requested is None
        else "modules_to_not_convert (or tied / fp32-kept weights)"
    )
    report = SplitReport(num_clusters=num_clusters)
    for name, layer in eligible_layers(model).items():
        kind = layer_kind(layer)
        if name in kept:
            report.not_split[name] = kept_reason
            continue
        if layer.weight.numel() < num_clusters:
            report.not_split[name] = f"fewer weights than clusters ({layer.weight.numel()} < {num_clusters})"
            continue
        try:
            new = split_layer(layer, num_clusters, clustering)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        set_submodule(model, name, new)
        report.split[name] = f"{kind.name} ({_resolve_clustering(clustering, kind)})"
    _report_other_modules(model, report)
    model.split_report = report
    for line in report.summary().splitlines():
        logger.info("SplitQuant split: %s", line)
    return model


def _report_other_modules(model: nn.Module, report: SplitReport) -> None:
    """Record in ``report.not_split`` every other module holding parameters (not a layer kind that splits)."""
    for name, module in model.named_modules():
        if name in report.split or name in report.not_split or isinstance(module, SplitBranches):
            continue
        if any(name.startswith(s + ".") for s in report.split):
            continue  # the branches of a split layer
        if any(p is not None for p in module._parameters.values()):
            report.not_split[name or "<root>"] = f"{type(module).__name__}: not a Linear/Conv1D/Conv2d layer"


def merge_split(model: nn.Module) -> nn.Module:
    """Replace every split branch module by the single float layer it came from, in place (exact)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SplitBranches):
            set_submodule(model, name, module.merge())
    if hasattr(model, "split_report"):
        del model.split_report
    return model


def dequantize_to_split(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``SplitQuantLinear`` / ``SplitQuantConv2d`` by its explicit split float form, in place.

    Branch ``j`` holds the dequantized weights of cluster ``j`` and exact zeros elsewhere (so the
    branches sum to exactly the weight the quantized layer computes with); the float bias is split
    by its own k-means as in :func:`split_model`. The result exports to ONNX and feeds edge
    quantizers like any split model. A transformers model loses its quantization config.
    """
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, SplitQuantModule):
            continue
        set_submodule(model, name, _quantized_to_split(module, dtype))
        count += 1
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    logger.info("SplitQuant: %d quantized layers turned into explicit split float layers", count)
    return model


def _quantized_to_split(module: SplitQuantModule, dtype: torch.dtype | None) -> SplitBranches:
    if dtype is None:
        dtype = module._float_dtype()
    kind = layer_kind(module)
    rows = split_branches(module.quantized_weight(), module.spec, dtype)
    bias = None if module.bias is None else module.bias.detach().to(dtype)
    bias_ids = _bias_ids(bias, module.spec.num_clusters)
    biases = (
        None
        if bias is None
        else [torch.where(bias_ids == j, bias, torch.zeros((), dtype=dtype)) for j in range(len(rows))]
    )
    template = kind.empty_float(module, device="meta")
    weights = [kind.from_rows(r, template.weight.shape) for r in rows]
    return kind.split_type.from_branch_weights(template, weights, biases)
