"""Registers SplitQuant with transformers' auto-quantization maps (safe to run more than once)."""

from __future__ import annotations

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .config import QUANT_METHOD, SplitQuantConfig
from .quantizer import SplitQuantHfQuantizer


def register() -> None:
    """Map ``quant_method="splitquant"`` to this package's config and quantizer.

    transformers' decorators refuse a name twice; a second import (or the package imported under
    another name) re-points the maps to the newest classes instead of failing.
    """
    if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = SplitQuantConfig
    else:
        register_quantization_config(QUANT_METHOD)(SplitQuantConfig)
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = SplitQuantHfQuantizer
    else:
        register_quantizer(QUANT_METHOD)(SplitQuantHfQuantizer)
