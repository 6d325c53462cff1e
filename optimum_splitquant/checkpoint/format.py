"""SplitQuant's stored format, versions 1 to 4: the one place that names and shapes the stored tensors.

For every quantized layer ``L`` whose weight is seen as a matrix of ``rows`` output channels by
``width`` input weights (``k = num_clusters``, ``G = width / group_size`` or 1,
``w = bits + ceil(log2 k)``):

=====================  ======================  ==================================  =====================================
name                   dtype                   shape                               content
=====================  ======================  ==================================  =====================================
``L.weight_packed``    ``uint8``               ``(rows, ceil(width / 8) * w)``     per weight ``cluster_id << bits | code``
``L.weight_scale``     ``scale_dtype`` (fp16)  ``(rows, G, k)``                    step of each (row, group, cluster)
``L.weight_offset``    ``scale_dtype`` (fp16)  ``(rows, G, k)``                    minimum of each (row, group, cluster)
``L.bias``             float                   ``(rows,)``                         kept in float, only if the layer has one
=====================  ======================  ==================================  =====================================

Version 2 adds coded ranges (``range_bits`` set, :mod:`optimum_splitquant.core.ranges`): instead
of ``weight_scale`` and ``weight_offset`` a layer stores (``lines = rows * G``, ``B = range_block``,
``r = range_bits``)

==========================  ======================  ==================================  ================================
name                        dtype                   shape                               content
==========================  ======================  ==================================  ================================
``L.weight_range_codes``    ``uint8``               ``(ceil(2 * lines * k / 8) * r,)``  scale codes, then offset codes
``L.weight_range_steps``    ``scale_dtype`` (fp16)  ``(ceil(lines / B), 2, k)``         scale and offset step per block
==========================  ======================  ==================================  ================================

and the scales and offsets are decoded from them for each use (a forward pass, a check; never held
in memory or saved). Version 3 stores the same tensors and reads the offset codes as
signed (around a zero code, :mod:`optimum_splitquant.core.ranges`): offsets of both signs share a
block. Version 4 adds column scales (``column_scales``, :mod:`optimum_splitquant.core.quantize`):
a layer of at least :data:`~optimum_splitquant.core.spec.COLUMN_SCALE_MIN_ROWS` rows also stores

==========================  ======================  ==================================  ================================
``L.weight_column_scale``   ``scale_dtype`` (fp16)  ``(width,)``                        scale of each input column
==========================  ======================  ==================================  ================================

and its dequantized weight is the version 1-3 one times ``weight_column_scale`` (per column).
Each checkpoint is written in the oldest version that holds its settings: 1 without coded ranges or
column scales, 3 with coded ranges (2 only when a config asks for it), 4 with column scales.

The bit layout of ``weight_packed`` is documented in :mod:`optimum_splitquant.core.packing`; the
dequantized weight is ``offset[row, group, id] + code * scale[row, group, id]``
(:mod:`optimum_splitquant.core.quantize`). Every safetensors header of a save carries
:data:`METADATA_FORMAT_KEY` (the version), :data:`METADATA_SAVE_ID_KEY` (fresh per save) and
:data:`METADATA_SETTINGS_KEY` (the settings the tensors depend on, as JSON).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.packing import packed_row_bytes
from ..core.ranges import range_codes_bytes
from ..core.spec import QuantSpec

__all__ = [
    "BIAS",
    "CODED_TENSORS",
    "COLUMN_SCALE",
    "COMPUTE_TENSORS",
    "FORMAT_VERSION",
    "LAYER_TENSORS",
    "METADATA_FORMAT_KEY",
    "METADATA_SAVE_ID_KEY",
    "METADATA_SETTINGS_KEY",
    "OFFSET",
    "PACKED",
    "RANGE_CODES",
    "RANGE_STEPS",
    "SCALE",
    "SCALE_FILE_DTYPES",
    "TensorLayout",
    "coded_version",
    "format_version",
    "layer_tensors",
    "stored_tensors",
]

FORMAT_VERSION = 4
"""The newest format this release reads and writes (each checkpoint in the oldest version that holds it)."""

PACKED = "weight_packed"
SCALE = "weight_scale"
OFFSET = "weight_offset"
BIAS = "bias"
RANGE_CODES = "weight_range_codes"
RANGE_STEPS = "weight_range_steps"
COLUMN_SCALE = "weight_column_scale"
COMPUTE_TENSORS = (PACKED, SCALE, OFFSET)
"""The tensors one quantized layer computes with (the bias is a plain float parameter); all stored
unless the ranges are coded (then the scales and offsets are rebuilt from :data:`CODED_TENSORS`).
What a layer of a given spec saves: :func:`stored_tensors`."""
CODED_TENSORS = (RANGE_CODES, RANGE_STEPS)
"""The stored tensors of coded ranges (formats 2 and 3)."""
LAYER_TENSORS = (*COMPUTE_TENSORS, *CODED_TENSORS, COLUMN_SCALE)
"""Every tensor a quantized layer may hold, stored or decoded (without the bias)."""

METADATA_FORMAT_KEY = "splitquant_format_version"
METADATA_SAVE_ID_KEY = "splitquant_save_id"
METADATA_SETTINGS_KEY = "splitquant_settings"

SCALE_FILE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
"""safetensors dtype names accepted for scales, offsets and biases, with their torch dtypes."""


@dataclass(frozen=True)
class TensorLayout:
    """Shape and accepted safetensors dtype names of one stored tensor."""

    shape: tuple[int, ...]
    file_dtypes: tuple[str, ...]


def format_version(spec: QuantSpec) -> int:
    """The format that stores layers of ``spec``: 4 with column scales, else 1 without coded ranges,
    else 3 (signed offsets) or 2."""
    if spec.column_scales:
        return 4
    if spec.range_bits is None:
        return 1
    return 3 if spec.signed_offsets else 2


def coded_version(spec: QuantSpec) -> int | None:
    """The format version every header of a checkpoint of ``spec`` must state, or None (any version).

    Coded ranges need one (versions 2 and 3 read the same offset codes differently), and so do
    column scales (only version 4 has them); any other layer reads the same in every version.
    """
    return None if spec.range_bits is None and not spec.column_scales else format_version(spec)


def stored_tensors(spec: QuantSpec, rows: int | None = None) -> tuple[str, ...]:
    """Names of the quantized tensors a layer of ``spec`` (and ``rows`` rows) saves (without the bias).

    ``rows=None`` names every tensor such a layer may save (column scales included when the spec has them).
    """
    names = COMPUTE_TENSORS if spec.range_bits is None else (PACKED, *CODED_TENSORS)
    if spec.column_scales and (rows is None or spec.has_column_scales(rows)):
        names += (COLUMN_SCALE,)
    return names


def layer_tensors(rows: int, width: int, spec: QuantSpec, *, bias: bool) -> dict[str, TensorLayout]:
    """The tensors one quantized layer stores, by name (without the module prefix).

    Raises ``ValueError`` when ``spec.group_size`` does not divide ``width``.
    """
    groups = spec.num_groups(width)
    ranges = (rows, groups, spec.num_clusters)
    floats = tuple(SCALE_FILE_DTYPES)
    tensors = {PACKED: TensorLayout((rows, packed_row_bytes(width, spec.symbol_width)), ("U8",))}
    if spec.range_bits is None:
        tensors[SCALE] = TensorLayout(ranges, floats)
        tensors[OFFSET] = TensorLayout(ranges, floats)
    else:
        lines, k = rows * groups, spec.num_clusters
        tensors[RANGE_CODES] = TensorLayout((range_codes_bytes(lines, k, spec.range_bits),), ("U8",))
        tensors[RANGE_STEPS] = TensorLayout((-(-lines // spec.range_block), 2, k), floats)
    if spec.has_column_scales(rows):
        tensors[COLUMN_SCALE] = TensorLayout((width,), floats)
    if bias:
        tensors[BIAS] = TensorLayout((rows,), floats)
    return tensors
