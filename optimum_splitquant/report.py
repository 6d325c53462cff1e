"""Honest size accounting: effective bits per quantized weight and model sizes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .checkpoint.format import QUANTIZED_TENSORS
from .nn.compact import SplitQuantModule

__all__ = ["SizeReport", "effective_bits", "size_report"]


@dataclass(frozen=True)
class SizeReport:
    """Byte counts of a model's parameters and buffers.

    Attributes:
        quantized_layers: number of SplitQuant layers.
        quantized_weights: original weights those layers stand for.
        quantized_bytes: bytes of their codes, cluster ids, scales and offsets.
        other_bytes: every other parameter and buffer (embeddings, norms, biases, float layers).
    """

    quantized_layers: int
    quantized_weights: int
    quantized_bytes: int
    other_bytes: int

    @property
    def effective_bits(self) -> float:
        """(codes + cluster ids + scales + offsets) bits per original quantized weight."""
        return 8 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else 0.0

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes


def size_report(model: nn.Module) -> SizeReport:
    """Count what ``model`` stores, split between SplitQuant layers and everything else."""
    layers = [m for m in model.modules() if isinstance(m, SplitQuantModule)]
    q_ids = {id(getattr(m, b)) for m in layers for b in QUANTIZED_TENSORS}
    q_bytes = sum(m.storage_bits() for m in layers) // 8
    seen: set[int] = set()
    other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in q_ids or id(t) in seen:
            continue
        seen.add(id(t))
        other += t.numel() * t.element_size()
    return SizeReport(
        quantized_layers=len(layers),
        quantized_weights=sum(m.in_features * m.out_features for m in layers),
        quantized_bytes=q_bytes,
        other_bytes=other,
    )


def effective_bits(model: nn.Module) -> float:
    """Effective bits per quantized weight over all SplitQuant layers of ``model``."""
    return size_report(model).effective_bits
