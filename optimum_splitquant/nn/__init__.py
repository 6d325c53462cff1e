"""Quantized modules (compact) and explicit split float modules (the paper's branches)."""

from .branches import SplitBranches, SplitConv1D, SplitConv2d, SplitLinear
from .channel_split import ChannelSplitLinear
from .compact import SplitQuantModule, disable_weight_cache, enable_weight_cache
from .conv import SplitQuantConv2d
from .linear import SplitQuantLinear

__all__ = [
    "ChannelSplitLinear",
    "SplitBranches",
    "SplitConv1D",
    "SplitConv2d",
    "SplitLinear",
    "SplitQuantConv2d",
    "SplitQuantLinear",
    "SplitQuantModule",
    "disable_weight_cache",
    "enable_weight_cache",
]
