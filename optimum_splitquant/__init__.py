"""optimum-splitquant: SplitQuant (arXiv 2501.12428) weight quantization for transformers.

``import optimum_splitquant`` registers ``quant_method="splitquant"`` with transformers; do it
before loading a SplitQuant checkpoint.
"""

from ._registration import register as _register
from .config import FORMAT_VERSION, SplitQuantConfig
from .convert import quantize_model
from .core import QuantSpec, dequantize_weight, kmeans_1d, quantize_weight
from .nn import SplitQuantLinear
from .optimum_quantizer import SplitQuantizer
from .quantizer import SplitQuantHfQuantizer
from .report import effective_bits, size_report
from .saving import save_pretrained_atomic
from .verify import verify_checkpoint

__version__ = "0.1.0"

_register()

__all__ = [
    "FORMAT_VERSION",
    "QuantSpec",
    "SplitQuantConfig",
    "SplitQuantHfQuantizer",
    "SplitQuantLinear",
    "SplitQuantizer",
    "__version__",
    "dequantize_weight",
    "effective_bits",
    "kmeans_1d",
    "quantize_model",
    "quantize_weight",
    "save_pretrained_atomic",
    "size_report",
    "verify_checkpoint",
]
