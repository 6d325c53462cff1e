"""transformers glue: the config, the thin quantizer, registration, in-memory quantization, optimum's interface."""

from .config import QUANT_METHOD, SplitQuantConfig
from .optimum import SplitQuantizer
from .quantize_model import quantize_model
from .quantizer import SplitQuantHfQuantizer
from .registration import register
from .verify import CheckpointReport, verify_checkpoint

__all__ = [
    "QUANT_METHOD",
    "CheckpointReport",
    "SplitQuantConfig",
    "SplitQuantHfQuantizer",
    "SplitQuantizer",
    "quantize_model",
    "register",
    "verify_checkpoint",
]
