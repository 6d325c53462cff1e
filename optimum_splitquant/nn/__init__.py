"""Quantized modules (compact) and explicit split float modules (the paper's branches).

Read in this order: :mod:`.geometry` (each layer type's matrix view and float twin), :mod:`.compact`
(the stored tensors of one layer, quantizing, loading, the compute choice), :mod:`.compute` (the
stateless arithmetic on each device), :mod:`.linear` and :mod:`.conv` (the layer kinds' forward
passes); :mod:`.validation` checks stored tensors, :mod:`.quality` measures a quantization's error,
:mod:`.branches` and :mod:`.channel_split` hold the explicit split float forms.
"""

from .branches import SplitBranches, SplitConv1D, SplitConv2d, SplitLinear
from .channel_split import ChannelSplitLinear
from .compact import SplitQuantModule, disable_weight_cache, enable_weight_cache, select_compute
from .compute import ComputePath, dequantize_compact, linear_compact, select_path
from .conv import SplitQuantConv2d
from .linear import SplitQuantLinear

__all__ = [
    "ChannelSplitLinear",
    "ComputePath",
    "SplitBranches",
    "SplitConv1D",
    "SplitConv2d",
    "SplitLinear",
    "SplitQuantConv2d",
    "SplitQuantLinear",
    "SplitQuantModule",
    "dequantize_compact",
    "disable_weight_cache",
    "enable_weight_cache",
    "linear_compact",
    "select_compute",
    "select_path",
]
