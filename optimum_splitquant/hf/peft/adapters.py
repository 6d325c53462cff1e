"""Loading and merging LoRA adapters of SplitQuant models, and the helpers of earlier versions.

:func:`load_lora_adapter` is ``PeftModel.from_pretrained`` that also loads adapter files whose
``modules_to_save`` copies were saved packed; :func:`merge_lora` merges and can quantize the merged
layers again. :func:`register_lora_layers` and :func:`get_lora_model` are deprecated.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from torch import nn

from ...checkpoint.format import PACKED
from ...core.spec import QuantSpec
from ...layers import quantize_layer, set_submodule
from ...nn.compact import SplitQuantModule
from ...nn.conv import SplitQuantConv2d
from ...nn.linear import SplitQuantLinear
from .hooks import KEEP_PACKED, register_with_peft
from .layers import SplitQuantLoraLinear, SplitQuantModulesToSave, reject_conv2d

__all__ = ["get_lora_model", "load_lora_adapter", "merge_lora", "register_lora_layers"]

logger = logging.getLogger(__name__)


def _refuse_pickled_adapter(adapter: str | Path, subfolder: str | None) -> None:
    """Raise ``ValueError`` when a local adapter folder holds its weights only as a pickle (PEFT would unpickle it)."""
    folder = Path(adapter, subfolder or "")
    if folder.is_dir() and not (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        pickled = sorted(p.name for p in folder.glob("adapter_model*.bin"))
        if pickled:
            raise ValueError(
                f"{folder} holds the adapter weights as {pickled[0]}, a pickle; optimum-splitquant loads safetensors "
                "only: save the adapter again with save_pretrained() (safetensors by default) and load that"
            )


def _packed_copies(adapter: str | Path, subfolder: str | None) -> set[str]:
    """Layers whose ``modules_to_save`` copy a local adapter file stores packed (from the file's header).

    Only adapters saved by versions that copied such layers packed hold them.
    """
    path = Path(adapter, subfolder or "", SAFETENSORS_WEIGHTS_NAME)
    if not path.is_file():
        return set()
    with safe_open(str(path), framework="pt") as stored:
        keys = list(stored.keys())
    suffix = f".{PACKED}"
    return {key.removeprefix("base_model.model.").removesuffix(suffix) for key in keys if key.endswith(suffix)}


def register_lora_layers(config: LoraConfig) -> LoraConfig:
    """Deprecated: plain PEFT adapts SplitQuant layers now. Registers them on this ``config`` (in place)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a peft LoraConfig, got {type(config).__name__}")
    warnings.warn(
        "register_lora_layers is no longer needed: peft's get_peft_model and PeftModel.from_pretrained adapt "
        "SplitQuant layers with a plain LoraConfig",
        DeprecationWarning,
        stacklevel=2,
    )
    config._register_custom_module({SplitQuantLinear: SplitQuantLoraLinear, SplitQuantConv2d: reject_conv2d})
    return config


def get_lora_model(model: nn.Module, config: LoraConfig, *, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """Deprecated: ``peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)`` does the same."""
    warnings.warn("get_lora_model is no longer needed: use peft.get_peft_model", DeprecationWarning, stacklevel=2)
    register_with_peft()
    return get_peft_model(model, config, adapter_name=adapter_name, **kwargs)


def load_lora_adapter(
    model: nn.Module,
    adapter: str | Path,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """``PeftModel.from_pretrained`` for a SplitQuant ``model``, also for adapters with packed copies.

    ``modules_to_save`` copies of SplitQuant layers load as float copies, as PEFT makes them now;
    copies a local adapter file stores packed (saved by versions that copied such layers packed) load
    as saved, and do not train. ``kwargs`` go to ``PeftModel.from_pretrained``.
    """
    register_with_peft()
    _refuse_pickled_adapter(adapter, kwargs.get("subfolder"))
    packed = _packed_copies(adapter, kwargs.get("subfolder"))
    if packed:
        logger.warning(
            "%s stores the modules_to_save copies of %s packed (saved by an earlier version): they load as "
            "saved and do not train; train them again with peft.get_peft_model to save float copies",
            adapter,
            sorted(packed),
        )
    token = KEEP_PACKED.set(frozenset(packed))
    try:
        return PeftModel.from_pretrained(
            model, str(adapter), adapter_name=adapter_name, is_trainable=is_trainable, **kwargs
        )
    finally:
        KEEP_PACKED.reset(token)


def merge_lora(model: PeftModel, *, requantize: bool = False, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapters and drop PEFT's wrappers; returns the underlying transformers model.

    The adapted layers come back as float layers holding ``dequantized weight + delta`` (outputs
    unchanged), and ``modules_to_save`` SplitQuant layers as their trained float copies; with
    ``requantize``, both as SplitQuant layers quantized again from those weights with their original
    settings.
    """
    specs: dict[str, QuantSpec] = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, SplitQuantLoraLinear):
            held = module._quantized_base
            specs[name] = (held if held is not None else module.get_base_layer()).spec
        elif isinstance(module, SplitQuantModulesToSave) and module.active_adapters:
            for inner, layer in module.original_module.named_modules():
                if isinstance(layer, SplitQuantModule):
                    specs[f"{name}.{inner}" if inner else name] = layer.spec
    merged = model.merge_and_unload(safe_merge=safe_merge)
    if requantize:
        for name, spec in specs.items():
            with torch.no_grad():
                set_submodule(merged, name, quantize_layer(merged.get_submodule(name), spec))
        logger.info("SplitQuant: %d merged layers quantized again", len(specs))
    return merged
