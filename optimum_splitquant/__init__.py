"""optimum-splitquant: SplitQuant (arXiv 2501.12428) weight quantization for transformers.

``import optimum_splitquant`` registers ``quant_method="splitquant"`` with transformers. An installed
package also registers it on its own when transformers loads its quantizer registry (the start-up
hook ``optimum_splitquant-autoload.pth``; ``OPTIMUM_SPLITQUANT_NO_AUTOLOAD=1`` turns it off).
"""

from .checkpoint import FORMAT_VERSION, save_pretrained_atomic
from .core import QuantSpec, dequantize_weight, kmeans_1d, quantize_weight
from .edge import dequantize_to_split, merge_split, split_model
from .hf import (
    SplitQuantConfig,
    SplitQuantHfQuantizer,
    SplitQuantizer,
    quantize_model,
    verify_checkpoint,
)
from .hf import register as _register
from .nn import SplitQuantConv2d, SplitQuantLinear, SplitQuantModule
from .report import effective_bits, size_report

__version__ = "0.2.0"

_register()

__all__ = [
    "FORMAT_VERSION",
    "QuantSpec",
    "SplitQuantConfig",
    "SplitQuantConv2d",
    "SplitQuantHfQuantizer",
    "SplitQuantLinear",
    "SplitQuantModule",
    "SplitQuantizer",
    "__version__",
    "dequantize_to_split",
    "dequantize_weight",
    "effective_bits",
    "kmeans_1d",
    "merge_split",
    "quantize_model",
    "quantize_weight",
    "save_pretrained_atomic",
    "size_report",
    "split_model",
    "verify_checkpoint",
]
