"""The settings one quantized weight is built and read with (pure Python, no transformers)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CLUSTERINGS",
    "COLUMN_SCALE_MIN_ROWS",
    "MAX_CLUSTERS",
    "MAX_RANGE_BLOCK",
    "RANGE_BITS",
    "SCALE_DTYPES",
    "SUPPORTED_BITS",
    "QuantSpec",
    "check_num_clusters",
    "check_range_block",
    "int_field",
]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
MAX_CLUSTERS = 16
CLUSTERINGS = ("tensor", "channel")
FITS = ("minmax", "mse")
RANGE_BITS = (4, 5, 6, 7, 8)
MAX_RANGE_BLOCK = 1 << 16
"""Largest ``range_block``: a block longer than a layer's lines is one block of all of them."""
COLUMN_SCALE_MIN_ROWS = 32
"""Layers of fewer rows store no column scales (one scale per input column would cost over half a bit
per weight there)."""
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def int_field(
    name: str, value: Any, *, allowed: str, valid: Callable[[int], bool] | None = None, not_int: type = TypeError
) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) for which ``valid`` holds.

    Otherwise raises ``not_int`` (a wrong type) or ``ValueError`` (a wrong value), with a message
    naming the field, the value and what is ``allowed``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise not_int(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if valid is not None and not valid(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_num_clusters(value: Any, *, not_int: type = ValueError) -> int:
    """``value`` if it is a valid k for the 1-D k-means (an integer in ``[1, MAX_CLUSTERS]``)."""
    allowed = f"an integer in [1, {MAX_CLUSTERS}]"
    return int_field("num_clusters", value, allowed=allowed, valid=lambda k: 1 <= k <= MAX_CLUSTERS, not_int=not_int)


def check_range_block(value: Any, *, not_int: type = ValueError) -> int:
    """``value`` if it is a valid ``range_block`` (an integer in ``[1, MAX_RANGE_BLOCK]``)."""
    allowed = f"an integer in [1, {MAX_RANGE_BLOCK}]"
    return int_field("range_block", value, allowed=allowed, valid=lambda b: 1 <= b <= MAX_RANGE_BLOCK, not_int=not_int)


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is split and quantized.

    Attributes:
        bits: code width per weight inside its cluster (2 to 8).
        num_clusters: k of the 1-D k-means; 1 is plain asymmetric min-max quantization.
        group_size: input columns sharing one (scale, offset) per cluster; ``None`` = whole row.
        clustering: ``"tensor"`` (one k-means over the whole weight, as in the paper) or
            ``"channel"`` (one k-means per output row).
        scale_dtype: storage dtype of scales and offsets.
        fit: how each (row, group, cluster) range is chosen: ``"minmax"`` (the paper: the members'
            minimum and maximum) or ``"mse"`` (from the best of several starting grids per row or
            group, least-squares refits alternating with moving each weight to the nearest level of
            its row or group; the same stored layout).
        range_bits: ``None`` stores every scale and offset in ``scale_dtype``; 4 to 8 stores each as
            a code of that many bits times a step shared by ``range_block`` consecutive (row, group)
            lines (:mod:`.ranges`; needs ``fit="mse"``, which refits the codes to the coded ranges).
        range_block: (row, group) lines sharing one pair of steps per cluster when ``range_bits`` is set
            (1 to :data:`MAX_RANGE_BLOCK`).
        signed_offsets: how coded offsets are read (:mod:`.ranges`): ``True`` (format 3) as signed codes
            around a zero code times a non-negative step, ``False`` (format 2, read for old checkpoints)
            as unsigned codes times a signed step.
        column_scales: ``True`` divides each input column of a weight by its own ``scale_dtype`` scale
            (its root mean square relative to the median of all of them, to the power 0.7) before quantizing and stores
            the scales (format 4): ``W ~ W_hat * c``, computed as ``W_hat (c * x)``. With codes of 4 or
            more bits, a layer rebuilt better without them stores ones (:mod:`.quantize`). Layers of
            fewer than :data:`COLUMN_SCALE_MIN_ROWS` rows store none (:meth:`has_column_scales`).
    """

    bits: int
    num_clusters: int = 3
    group_size: int | None = None
    clustering: str = "tensor"
    scale_dtype: torch.dtype = torch.float16
    fit: str = "minmax"
    range_bits: int | None = None
    range_block: int = 8
    signed_offsets: bool = True
    column_scales: bool = False

    def __post_init__(self) -> None:
        # The one validation of the settings (SplitQuantConfig delegates here): TypeError for a value of the
        # wrong type, ValueError for a wrong value, each message naming the field.
        int_field("bits", self.bits, allowed=f"one of {SUPPORTED_BITS}", valid=SUPPORTED_BITS.__contains__)
        check_num_clusters(self.num_clusters, not_int=TypeError)
        if self.group_size is not None:
            int_field("group_size", self.group_size, allowed="None or a positive integer", valid=lambda g: g >= 1)
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"clustering must be one of {CLUSTERINGS}, got {self.clustering!r}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if self.scale_dtype not in SCALE_DTYPES.values():
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.range_bits is not None:
            allowed = f"None or one of {RANGE_BITS}"
            int_field("range_bits", self.range_bits, allowed=allowed, valid=RANGE_BITS.__contains__)
            if self.fit != "mse":
                raise ValueError(
                    f"range_bits={self.range_bits} needs fit='mse' (codes are refitted to the coded ranges)"
                )
        check_range_block(self.range_block, not_int=TypeError)
        if not isinstance(self.signed_offsets, bool):
            raise TypeError(f"signed_offsets must be a bool, got {self.signed_offsets!r}")
        if not isinstance(self.column_scales, bool):
            raise TypeError(f"column_scales must be True or False, got {self.column_scales!r}")

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

    def has_column_scales(self, out_features: int) -> bool:
        """Whether a layer of ``out_features`` rows stores column scales under this spec."""
        return self.column_scales and out_features >= COLUMN_SCALE_MIN_ROWS

    def bits_per_weight(self, in_features: int, out_features: int | None = None) -> float:
        """Effective stored bits per weight of a layer with rows of ``in_features`` weights.

        Codes and cluster ids (:attr:`symbol_width`, rows padded to 8 symbols) plus a scale and an
        offset per (row, group, cluster) in :attr:`scale_dtype`, or with :attr:`range_bits` two codes
        per (row, group, cluster) and two steps per (block, cluster) (counted per line, as on a tall
        matrix: the code stream's padding and a short last block add a few bits per layer), plus with
        :attr:`column_scales` one scale per input column shared by the ``out_features`` rows
        (``None``: a square layer).
        """
        padded = -(-in_features // 8) * 8
        float_bits = torch.finfo(self.scale_dtype).bits
        per_range = float_bits if self.range_bits is None else self.range_bits + float_bits / self.range_block
        side = 2 * self.num_clusters * self.num_groups(in_features) * per_range
        rows = in_features if out_features is None else out_features
        if self.has_column_scales(rows):
            side += float_bits * in_features / rows
        return (padded * self.symbol_width + side) / in_features

    def overflow_advice(self) -> str:
        """What to do when a range does not fit :attr:`scale_dtype` (for error messages)."""
        if self.scale_dtype == torch.float32:
            return "the weights span more than float32 can hold (over 3.4e38); scale them down before quantizing"
        return "use scale_dtype='float32'"

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
