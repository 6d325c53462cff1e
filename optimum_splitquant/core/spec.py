"""The settings one quantized weight is built and read with (pure Python, no transformers)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CLUSTERINGS", "MAX_CLUSTERS", "SCALE_DTYPES", "SUPPORTED_BITS", "QuantSpec"]

SUPPORTED_BITS = (2, 3, 4, 8)
MAX_CLUSTERS = 16
CLUSTERINGS = ("tensor", "channel")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is split and quantized.

    Attributes:
        bits: code width per weight inside its cluster (2, 3, 4 or 8).
        num_clusters: k of the 1-D k-means; 1 is plain asymmetric min-max quantization.
        group_size: input columns sharing one (scale, offset) per cluster; ``None`` = whole row.
        clustering: ``"tensor"`` (one k-means over the whole weight, as in the paper) or
            ``"channel"`` (one k-means per output row).
        scale_dtype: storage dtype of scales and offsets.
    """

    bits: int
    num_clusters: int = 3
    group_size: int | None = None
    clustering: str = "tensor"
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        k = self.num_clusters
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_CLUSTERS:
            raise ValueError(f"num_clusters must be an integer in [1, {MAX_CLUSTERS}], got {k!r}")
        g = self.group_size
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise ValueError(f"group_size must be None or a positive integer, got {g!r}")
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"clustering must be one of {CLUSTERINGS}, got {self.clustering!r}")
        if self.scale_dtype not in SCALE_DTYPES.values():
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def levels(self) -> int:
        """Codes per cluster, ``2 ** bits``."""
        return 1 << self.bits

    @property
    def id_bits(self) -> int:
        """Bits of a cluster id: ``ceil(log2(num_clusters))`` (0 when there is one cluster)."""
        return math.ceil(math.log2(self.num_clusters)) if self.num_clusters > 1 else 0

    @property
    def symbol_width(self) -> int:
        """Packed bits per weight: cluster id and code together."""
        return self.bits + self.id_bits

    def num_groups(self, in_features: int) -> int:
        """Range groups per row; raises if ``group_size`` does not divide ``in_features``."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size != 0:
            raise ValueError(
                f"group_size={self.group_size} does not divide the input width {in_features}; "
                "choose a divisor of every quantized layer's input width or group_size=None"
            )
        return in_features // self.group_size
