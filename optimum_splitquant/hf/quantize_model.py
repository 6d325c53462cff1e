"""Quantizing a float model already in memory (the same result as quantizing at load time)."""

from __future__ import annotations

import logging

from torch import nn
from tqdm.auto import tqdm

from ..layers import eligible_layers, quantize_layer, resolve_modules_to_not_convert, set_submodule
from .config import SplitQuantConfig
from .quantizer import SplitQuantHfQuantizer

__all__ = ["quantize_model"]

logger = logging.getLogger(__name__)


def quantize_model(model: nn.Module, config: SplitQuantConfig | None = None, *, progress: bool = False) -> nn.Module:
    """Replace the eligible layers of a float transformers model by SplitQuant layers, in place.

    The model afterwards saves with ``save_pretrained`` / ``push_to_hub`` exactly like one
    quantized through ``from_pretrained(..., quantization_config=config)``.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("the model is already quantized; load its float original to quantize it again")
    quantizer = SplitQuantHfQuantizer(config or SplitQuantConfig(), pre_quantized=False)
    qconfig = quantizer.quantization_config
    kept = set(resolve_modules_to_not_convert(model, qconfig.modules_to_not_convert))
    todo = [(n, m) for n, m in eligible_layers(model).items() if n not in kept]
    for name, module in tqdm(todo, desc="SplitQuant", unit="layer", disable=not progress):
        try:
            layer = quantize_layer(module, quantizer.spec)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        set_submodule(model, name, layer)
    qconfig.modules_to_not_convert = sorted(kept)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = qconfig.quant_method
    model.config.quantization_config = qconfig
    logger.info("SplitQuant: %d layers quantized in memory", len(todo))
    return model
