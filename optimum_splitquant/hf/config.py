"""``SplitQuantConfig``: the transformers ``quantization_config`` of SplitQuant (format versions 1 to 4).

Written to ``config.json`` under ``quantization_config``; everything needed to read the
checkpoint back is here or in the tensors themselves, never in code defaults.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..checkpoint.format import FORMAT_VERSION
from ..core.spec import (
    SCALE_DTYPES,
    QuantSpec,
    int_field,
)

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "SplitQuantConfig"]

QUANT_METHOD = "splitquant"
_FIELDS = (
    "bits",
    "num_clusters",
    "group_size",
    "clustering",
    "scale_dtype",
    "fit",
    "range_bits",
    "range_block",
    "column_scales",
    "modules_to_not_convert",
    "format_version",
    "quant_method",
)

BUDGET_WIDTH = 512
"""Layer width at which :meth:`SplitQuantConfig.for_budget` counts a configuration's bits per weight:
narrower rows (and, with column scales, fewer rows) cost more side data per weight, so layers of at
least this many inputs and outputs stay within."""

# The best SplitQuant configuration measured within each budget of stored bits per weight, cheapest first:
# uniform codes with coded ranges and column scales. Groups of 32 or more columns, and 7- or 8-bit range
# codes where they fit: groups of 16 and 6-bit range codes lose the grid of checkpoints converted from
# GGUF blocks of 32 (SmolLM2-135M, Gemma 3 270M) and gain little on float weights (all-MiniLM-L6-v2,
# all-mpnet-base-v2). benchmarks/results/budget_table.md.
_CODED = {"num_clusters": 1, "fit": "mse", "column_scales": True}
_BUDGET_TABLE: tuple[dict[str, Any], ...] = (
    {"bits": 3, "group_size": 32, "range_bits": 7, "range_block": 32, **_CODED},  # 3.50 bits on square layers of 512
    {"bits": 3, "group_size": 16, "range_bits": 7, "range_block": 32, **_CODED},  # 3.97
    {"bits": 4, "group_size": 64, "range_bits": 6, "range_block": 16, **_CODED},  # 4.25
    {"bits": 4, "group_size": 32, "range_bits": 7, "range_block": 32, **_CODED},  # 4.50
    {"bits": 4, "group_size": 32, "range_bits": 8, "range_block": 16, **_CODED},  # 4.59
    {"bits": 5, "group_size": 32, "range_bits": 8, "range_block": 16, **_CODED},  # 5.59
)


def _format_version(value: Any, range_bits: int | None, column_scales: bool) -> int:
    """The validated ``format_version``: ``None`` picks the oldest that stores the settings."""
    needed = 4 if column_scales else 1 if range_bits is None else 2  # the oldest format that stores them
    if value is None:
        return 4 if column_scales else 1 if range_bits is None else 3
    version = int_field("format_version", value, allowed=f"an integer <= {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"format_version {version} was written by a newer optimum-splitquant; this release reads format "
            f"<= {FORMAT_VERSION}: upgrade with `pip install -U optimum-splitquant`"
        )
    if version < 1:
        raise ValueError(f"format_version must be >= 1, got {version}")
    if version < needed:
        setting = "column_scales=True" if column_scales else f"range_bits={range_bits}"
        raise ValueError(f"{setting} needs format_version >= {needed}, got {version}")
    return version


def _module_names(value: Any) -> list[str] | None:
    """``modules_to_not_convert`` checked: ``None``, or a list of names from a list, tuple or set of strings.

    A set comes back sorted (so the stored config is stable); a bare string or anything else
    (a dict, a range, a generator) is a ``TypeError`` naming the field.
    """
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(
            f"modules_to_not_convert must be None or a list of module names, got the string {value!r}: "
            f"write [{value!r}]"
        )
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(
            f"modules_to_not_convert must be None or a list of module names, got {type(value).__name__} {value!r}"
        )
    wrong = [name for name in value if not isinstance(name, str)]
    if wrong:
        raise TypeError(f"modules_to_not_convert must be None or a list of module names; not names: {wrong!r}")
    return sorted(value) if isinstance(value, (set, frozenset)) else list(value)


class SplitQuantConfig(QuantizationConfigMixin):
    """Settings of SplitQuant weight quantization, validated on construction.

    Args:
        bits: code bits per weight inside its cluster: 2 to 8.
        num_clusters: clusters of the 1-D k-means (3 as in the paper; 1 = plain min-max).
        group_size: input columns sharing one range per cluster; ``None`` = one per output row.
        clustering: ``"tensor"`` (one k-means per weight matrix, as in the paper) or ``"channel"``.
        scale_dtype: storage dtype of scales and offsets: ``"float16"``, ``"bfloat16"``, ``"float32"``.
        fit: how each (row or group, cluster) range is chosen: ``"minmax"`` (the paper's min-max
            range) or ``"mse"`` (least-squares ranges from the best of several starting grids, each
            weight on the nearest level of its row or group; the same stored size, a lower
            reconstruction error). Only quantizing reads it.
        range_bits: ``None`` (default) stores each scale and offset in ``scale_dtype``; 4 to 8 stores
            each as a code of that many bits times a step shared by ``range_block`` consecutive
            (row, group) lines (format 3; needs ``fit="mse"``): a quarter of the side data, so
            smaller groups fit the same budget.
        range_block: (row, group) lines sharing one scale step and one offset step per cluster
            (1 to 65536; a block longer than a layer's lines is one block of all of them).
        column_scales: ``True`` stores one ``scale_dtype`` scale per input column and quantizes each
            column divided by it (format 4; layers of fewer than 32 rows store none): columns of very
            different magnitudes share each row's ranges better, for 16 / rows bits per weight. With
            4 or more bits, a layer rebuilt better without them (weights already on a 4-bit grid)
            stores ones.
        modules_to_not_convert: module names kept in float (a list, tuple or set of strings). ``None`` keeps the task head
            (classifier / lm_head / tied output embeddings) in float; the resolved list is written
            back here when a model is quantized. ``[]`` quantizes every eligible layer.
        format_version: on-disk format; ``None`` picks the oldest that holds the settings: 1 without
            ``range_bits`` or ``column_scales``, 3 with coded ranges (signed offset codes), 4 with column
            scales. 2 writes and reads coded ranges as older releases did (unsigned offset codes). This
            release reads and writes versions 1 to 4.
    """

    def __init__(
        self,
        bits: int = 4,
        num_clusters: int = 3,
        group_size: int | None = None,
        clustering: str = "tensor",
        scale_dtype: str = "float16",
        fit: str = "minmax",
        range_bits: int | None = None,
        range_block: int = 8,
        column_scales: bool = False,
        modules_to_not_convert: list[str] | None = None,
        format_version: int | None = None,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(
                f"SplitQuantConfig got unknown field(s) {sorted(kwargs)}; allowed fields are {list(_FIELDS)}"
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {scale_dtype!r}")
        QuantSpec(  # the one validation of the settings (same exception types and messages)
            bits=bits,
            num_clusters=num_clusters,
            group_size=group_size,
            clustering=clustering,
            scale_dtype=SCALE_DTYPES[scale_dtype],
            fit=fit,
            range_bits=range_bits,
            range_block=range_block,
            column_scales=column_scales,
        )
        self.quant_method = QUANT_METHOD
        self.bits, self.num_clusters, self.group_size, self.clustering = bits, num_clusters, group_size, clustering
        self.scale_dtype, self.fit, self.range_bits, self.range_block = scale_dtype, fit, range_bits, range_block
        self.modules_to_not_convert = _module_names(modules_to_not_convert)
        self.column_scales = column_scales
        self.format_version = _format_version(format_version, range_bits, column_scales)

    @classmethod
    def for_budget(cls, bits_per_weight: float, **overrides: Any) -> SplitQuantConfig:
        """The best configuration measured within ``bits_per_weight`` stored bits per weight.

        Bits count everything stored (codes, cluster ids, scales, offsets, column scales) on layers of
        at least :data:`BUDGET_WIDTH` inputs and outputs. ``overrides`` (e.g. ``modules_to_not_convert``)
        are passed on.
        """
        if isinstance(bits_per_weight, bool) or not isinstance(bits_per_weight, (int, float)):
            raise TypeError(f"bits_per_weight must be a number, got {bits_per_weight!r}")
        if not math.isfinite(bits_per_weight):
            raise ValueError(f"bits_per_weight must be finite, got {bits_per_weight!r}")
        fitting = [c for c in _BUDGET_TABLE if cls(**c).to_spec().bits_per_weight(BUDGET_WIDTH) <= bits_per_weight]
        if not fitting:
            smallest = cls(**_BUDGET_TABLE[0]).to_spec().bits_per_weight(BUDGET_WIDTH)
            raise ValueError(
                f"no SplitQuant configuration fits in {bits_per_weight} bits per weight; the smallest measured "
                f"one stores {smallest:.3g} bits per weight"
            )
        return cls(**{**fitting[-1], **overrides})

    def to_spec(self) -> QuantSpec:
        """The pure-core settings for one weight."""
        return QuantSpec(
            bits=self.bits,
            num_clusters=self.num_clusters,
            group_size=self.group_size,
            clustering=self.clustering,
            scale_dtype=SCALE_DTYPES[self.scale_dtype],
            fit=self.fit,
            range_bits=self.range_bits,
            range_block=self.range_block,
            signed_offsets=self.format_version >= 3,
            column_scales=self.column_scales,
        )

    def storage_settings(self) -> dict[str, Any]:
        """The settings the stored tensors depend on (also written into every safetensors header).

        ``range_bits`` and ``range_block`` appear only when set (format 1 headers have neither), and
        ``column_scales`` only when true (headers before format 4 do not have it).
        """
        names = ("bits", "num_clusters", "group_size", "clustering")
        if self.range_bits is not None:
            names += ("range_bits", "range_block")
        if self.column_scales:
            names += ("column_scales",)
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (what ``config.json`` stores)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in _FIELDS}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SplitQuantConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]
