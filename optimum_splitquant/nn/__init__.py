"""Quantized modules."""

from .linear import SplitQuantLinear

__all__ = ["SplitQuantLinear"]
