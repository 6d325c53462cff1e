"""The paper's face for edge toolchains: explicit split float models, activation splitting, ONNX export.

``optimum_splitquant.edge.onnx`` needs the ``onnx`` extra and is not imported here.
"""

from .activation_split import split_activations
from .split import SplitReport, dequantize_to_split, layer_cluster_ids, merge_split, split_layer, split_model

__all__ = [
    "SplitReport",
    "dequantize_to_split",
    "layer_cluster_ids",
    "merge_split",
    "split_activations",
    "split_layer",
    "split_model",
]
