"""Pure torch core: 1-D k-means, sub-byte packing, split quantization. Imports torch only."""

from .kmeans import KMeans1D, assign_clusters, kmeans_1d
from .packing import pack_rows, packed_row_bytes, unpack_rows
from .quantize import QuantizedWeight, cluster_ids, decode_symbols, dequantize_weight, quantize_weight, split_branches
from .spec import CLUSTERINGS, MAX_CLUSTERS, SCALE_DTYPES, SUPPORTED_BITS, QuantSpec

__all__ = [
    "CLUSTERINGS",
    "MAX_CLUSTERS",
    "SCALE_DTYPES",
    "SUPPORTED_BITS",
    "KMeans1D",
    "QuantSpec",
    "QuantizedWeight",
    "assign_clusters",
    "cluster_ids",
    "decode_symbols",
    "dequantize_weight",
    "kmeans_1d",
    "pack_rows",
    "packed_row_bytes",
    "quantize_weight",
    "split_branches",
    "unpack_rows",
]
