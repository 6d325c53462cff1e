"""SplitQuant's stored format, version 1: the one place that names and shapes the stored tensors.

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
from ..core.spec import QuantSpec

__all__ = [
    "BIAS",
    "FORMAT_VERSION",
    "METADATA_FORMAT_KEY",
    "METADATA_SAVE_ID_KEY",
    "METADATA_SETTINGS_KEY",
    "OFFSET",
    "PACKED",
    "QUANTIZED_TENSORS",
    "SCALE",
    "SCALE_FILE_DTYPES",
    "TensorLayout",
    "layer_tensors",
]

FORMAT_VERSION = 1
"""The format this release writes, and the newest it reads."""

PACKED = "weight_packed"
SCALE = "weight_scale"
OFFSET = "weight_offset"
BIAS = "bias"
QUANTIZED_TENSORS = (PACKED, SCALE, OFFSET)
"""The tensors that hold one layer's quantized weight (the bias is a plain float parameter)."""

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


def layer_tensors(rows: int, width: int, spec: QuantSpec, *, bias: bool) -> dict[str, TensorLayout]:
    """The tensors one quantized layer stores, by name (without the module prefix).

    Raises ``ValueError`` when ``spec.group_size`` does not divide ``width``.
    """
    ranges = (rows, spec.num_groups(width), spec.num_clusters)
    floats = tuple(SCALE_FILE_DTYPES)
    tensors = {
        PACKED: TensorLayout((rows, packed_row_bytes(width, spec.symbol_width)), ("U8",)),
        SCALE: TensorLayout(ranges, floats),
        OFFSET: TensorLayout(ranges, floats),
    }
    if bias:
        tensors[BIAS] = TensorLayout((rows,), floats)
    return tensors
