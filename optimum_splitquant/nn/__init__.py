"""Quantized modules (compact) and explicit split float modules (the paper's branches)."""

from .branches import SplitBranches, SplitConv1D, SplitConv2d, SplitLinear
from .channel_split import ChannelSplitLinear
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
]
