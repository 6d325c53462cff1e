"""Honest accounting of a quantized model: what it stores (sizes, effective bits per weight) and what
quantizing it cost in reconstruction error (SQNR per layer, a model-level figure, a warning floor)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from .checkpoint.format import LAYER_TENSORS
from .nn.compact import SplitQuantModule
from .nn.quality import QuantizationError

__all__ = [
    "SQNR_FLOOR_DB",
    "QualityReport",
    "SizeReport",
    "effective_bits",
    "log_quality",
    "quality_report",
    "size_report",
]


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
    q_ids = {id(getattr(m, b, None)) for m in layers for b in LAYER_TENSORS}  # stored or decoded
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


SQNR_FLOOR_DB = 15.0
"""Model-level SQNR (:attr:`QualityReport.sqnr_db`) below which a quantized model is reported unusable.

Set between the configurations measured usable and unusable on real weights (model-level SQNR,
with the quality of the same configuration: MiniLM mean embedding cosine to FP32, SmolLM2-135M
perplexity on 4,096 BBC News tokens, FP32 24.89):

=====================  ==========================  ============================
configuration          all-MiniLM-L6-v2            SmolLM2-135M
=====================  ==========================  ============================
``bits=2`` (k = 3)     13.0 dB, cosine 0.812       13.5 dB, perplexity 251.7
``bits=3`` (k = 3)     20.0 dB, 0.967              20.8 dB, 31.2
``bits=4`` (k = 3)     26.6 dB, 0.992              27.3 dB, 26.2
``for_budget(3.5)``    16.6 dB, 0.923              17.0 dB, 56.8
``for_budget(4.0)``    18.5 dB, 0.952              18.6 dB, 38.4
``for_budget(4.25)``   21.5 dB, 0.974              23.2 dB, 29.88
``for_budget(4.5)``    23.0 dB, 0.982              39.5 dB, 24.78
``for_budget(5.0)``    23.0 dB, 0.982              46.3 dB, 24.89
``for_budget(6.0)``    29.3 dB, 0.996              46.3 dB, 24.89
=====================  ==========================  ============================

The paper's INT2 with k = 3 is the one below the floor on both models (it generates garbage on
SmolLM2); every ``for_budget`` configuration is above it, the nearest by 1.6 dB (MiniLM, 3.5 bits).
(SmolLM2's weights come from a 4-bit GGUF grid, which grids aligned to its blocks hold nearly exactly.)
"""


@dataclass(frozen=True)
class QualityReport:
    """Reconstruction error of the layers quantized in this process (see :class:`QuantizationError`).

    Attributes:
        layers: each measured layer's error, by module name, in model order.
    """

    layers: Mapping[str, QuantizationError]

    @property
    def weights(self) -> int:
        return sum(e.weights for e in self.layers.values())

    @property
    def sqnr_db(self) -> float:
        """The model-level SQNR: ``-10 log10`` of the weight-weighted mean of the layers' ``noise / signal``.

        A mean of noise powers (not of decibels): a few badly reconstructed layers pull it down, exact
        layers (``inf`` dB on their own) count as zero noise.
        """
        if not self.weights:
            return math.inf
        mean = sum(e.weights * e.relative_noise for e in self.layers.values()) / self.weights
        return _db(mean)

    @property
    def worst(self) -> tuple[str, float] | None:
        """``(name, SQNR dB)`` of the layer with the lowest SQNR, or None without layers."""
        if not self.layers:
            return None
        name = max(self.layers, key=lambda n: self.layers[n].relative_noise)
        return name, self.layers[name].sqnr_db

    @property
    def usable(self) -> bool:
        """Whether :attr:`sqnr_db` reaches :data:`SQNR_FLOOR_DB`."""
        return self.sqnr_db >= SQNR_FLOOR_DB

    def summary(self, bits_per_weight: float | None = None) -> str:
        """One line: layers, effective bits per weight (if given), model-level and worst SQNR."""
        bits = "" if bits_per_weight is None else f", {bits_per_weight:.3f} bits per weight"
        worst = self.worst
        shown = "" if worst is None else f", worst {worst[1]:.1f} dB ({worst[0]})"
        return f"SplitQuant: {len(self.layers)} layers quantized{bits}; SQNR {self.sqnr_db:.1f} dB{shown}"

    def warning(self) -> str:
        """What :func:`log_quality` warns when the model is not :attr:`usable`."""
        return (
            f"SplitQuant: the quantized weights reconstruct the float ones at {self.sqnr_db:.1f} dB SQNR, below the "
            f"floor of {SQNR_FLOOR_DB:.1f} dB under which models measured here generate garbage; this model "
            "is likely unusable. Store more bits per weight: SplitQuantConfig.for_budget(4.5) keeps them usable"
        )


def _db(relative_noise: float) -> float:
    if relative_noise == 0:
        return math.inf
    return -10 * math.log10(relative_noise) if math.isfinite(relative_noise) else -math.inf


def quality_report(model: nn.Module) -> QualityReport:
    """The :class:`QualityReport` of ``model``'s SplitQuant layers quantized in this process.

    Layers read from a checkpoint carry no measurement and are left out.
    """
    return QualityReport(
        {
            name: m.quantization_error
            for name, m in model.named_modules()
            if isinstance(m, SplitQuantModule) and m.quantization_error is not None
        }
    )


def log_quality(model: nn.Module, log: logging.Logger) -> QualityReport:
    """Log ``model``'s :meth:`QualityReport.summary` at INFO on ``log``, and a warning if not :attr:`~QualityReport.usable`."""
    report = quality_report(model)
    if report.layers:
        log.info(report.summary(effective_bits(model)))
        if not report.usable:
            log.warning(report.warning())
    return report
