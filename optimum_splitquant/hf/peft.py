"""LoRA fine-tuning of SplitQuant models with PEFT (needs ``pip install optimum-splitquant[train]``).

The package never imports this module itself, so it imports without ``peft``.

PEFT's one hook for layer types it does not know is ``LoraConfig._register_custom_module``: it
lives on one config object and is not saved with the adapter. So register a config before
``get_peft_model``, and load adapters with :func:`load_lora_adapter` (which registers the saved
config)::

    from peft import LoraConfig, get_peft_model
    from optimum_splitquant.hf.peft import load_lora_adapter, register_lora_layers

    config = register_lora_layers(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(splitquant_model, config)  # train with transformers.Trainer or a loop
    model.save_pretrained("adapter")  # the LoRA weights only
    model = load_lora_adapter(fresh_splitquant_model, "adapter")

Each adapted :class:`~optimum_splitquant.nn.SplitQuantLinear` computes ``layer(x) +
lora_B(lora_A(dropout(x))) * scaling``; its packed buffers are never trained or written.

Merging (``merge_adapter()``, ``merge_and_unload()``, :func:`merge_lora`) puts back the float
layer the SplitQuant layer replaced (``nn.Linear``, or ``Conv1D`` for GPT-2) holding the
dequantized weight plus the LoRA delta: the outputs stay those of the adapted model, but that layer
is float again. ``unmerge_adapter()`` restores the quantized layer bit for bit.
``merge_lora(model, requantize=True)`` quantizes the merged layers again with their own settings
(compact again, at the price of a new rounding of the merged weight).

Not supported: LoRA on :class:`~optimum_splitquant.nn.SplitQuantConv2d` (a ``TypeError`` names
the layer), initialisations that rewrite the base weight (PiSSA, OLoRA, LoftQ, CorDA, ...).
``target_modules="all-linear"`` finds only float ``nn.Linear`` layers in PEFT: name the
projections instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core.spec import QuantSpec
from ..layers import layer_kind, quantize_layer, set_submodule
from ..nn.compact import SplitQuantModule
from ..nn.conv import SplitQuantConv2d
from ..nn.linear import SplitQuantLinear

__all__ = ["SplitQuantLoraLinear", "load_lora_adapter", "merge_lora", "register_lora_layers"]

logger = logging.getLogger(__name__)

# Initialisations that only read the base weight; the others rewrite it, which packed buffers cannot take.
READ_ONLY_INITS = (True, False, "gaussian", "orthogonal", "eva")


def _base(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer


class SplitQuantLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` over a :class:`SplitQuantLinear`: a frozen packed base, float adapters.

    Adapters take the device of the packed buffers and the dtype the layer dequantizes to (its bias
    dtype, else float32). While merged, ``_quantized_base`` holds the quantized layer.
    """

    _quantized_base: SplitQuantModule | None

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        init = config.init_lora_weights
        if not any(init is allowed or (isinstance(init, str) and init == allowed) for allowed in READ_ONLY_INITS):
            raise ValueError(
                f"init_lora_weights={init!r} rewrites the base weight, which a SplitQuant layer stores packed; "
                f"use one of {READ_ONLY_INITS}"
            )
        # The packed rows are output features; a Conv1D source (GPT-2) merges back into (in, out) weights.
        conv1d = getattr(_base(base_layer), "source", "linear") == "conv1d"
        if config.fan_in_fan_out != conv1d:
            logger.warning("setting fan_in_fan_out=%s for %s", conv1d, type(_base(base_layer)).__name__)
            config.fan_in_fan_out = conv1d
        object.__setattr__(self, "_quantized_base", None)
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int] | tuple[None, None]:
        if isinstance(module, SplitQuantLinear):
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[Any, Any]:
        # Without this PEFT reads ``base_layer.weight``, which dequantizes the whole layer.
        if isinstance(base_layer, SplitQuantModule):
            return base_layer.weight_packed.device, base_layer._float_dtype()
        return super()._get_base_layer_device_and_dtype(base_layer)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Swap in the float layer (dequantized weight), then merge the adapters into it as PEFT does."""
        base = self.get_base_layer()
        if isinstance(base, SplitQuantModule):
            float_layer = layer_kind(base).to_float(base).requires_grad_(False)
            self.base_layer = float_layer
            object.__setattr__(self, "_quantized_base", base)  # kept out of the module tree and state dict
        try:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        finally:
            if not self.merged and self._quantized_base is not None:
                self._restore_quantized_base()

    def unmerge(self) -> None:
        """Put the original quantized layer back (exact: its buffers were never touched)."""
        if self._quantized_base is None or not self.merged:
            super().unmerge()
            return
        self._restore_quantized_base()
        self.merged_adapters.clear()

    def _restore_quantized_base(self) -> None:
        device = self.get_base_layer().weight.device
        self.base_layer = self._quantized_base.to(device)
        object.__setattr__(self, "_quantized_base", None)


def _reject_conv2d(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module:
    name = kwargs.get("target_name") or type(_base(target)).__name__
    raise TypeError(
        f"LoRA on SplitQuantConv2d ({name}) is not supported: leave it out of target_modules, or keep it in "
        "float with SplitQuantConfig(modules_to_not_convert=[...])"
    )


def register_lora_layers(config: LoraConfig) -> LoraConfig:
    """Teach this PEFT ``config`` the SplitQuant layers (in place); returns it.

    Call it on every ``LoraConfig`` given to ``get_peft_model`` or ``PeftModel.from_pretrained``.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module({SplitQuantLinear: SplitQuantLoraLinear, SplitQuantConv2d: _reject_conv2d})
    return config


def load_lora_adapter(
    model: nn.Module,
    adapter: str | Path,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """``PeftModel.from_pretrained`` for a SplitQuant ``model``: reads and registers the saved LoRA config.

    ``kwargs`` go to ``PeftModel.from_pretrained``.
    """
    config = LoraConfig.from_pretrained(str(adapter))
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{adapter} holds a {type(config).__name__}, not a LoRA adapter")
    return PeftModel.from_pretrained(
        model,
        str(adapter),
        adapter_name=adapter_name,
        is_trainable=is_trainable,
        config=register_lora_layers(config),
        **kwargs,
    )


def merge_lora(model: PeftModel, *, requantize: bool = False, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapters and drop PEFT's wrappers; returns the underlying transformers model.

    The adapted layers come back as float layers holding ``dequantized weight + delta`` (outputs
    unchanged), or, with ``requantize``, as SplitQuant layers quantized again from that weight with
    their original settings.
    """
    specs: dict[str, QuantSpec] = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, SplitQuantLoraLinear):
            held = module._quantized_base
            specs[name] = (held if held is not None else module.get_base_layer()).spec
    merged = model.merge_and_unload(safe_merge=safe_merge)
    if requantize:
        for name, spec in specs.items():
            with torch.no_grad():
                set_submodule(merged, name, quantize_layer(merged.get_submodule(name), spec))
        logger.info("SplitQuant: %d merged layers quantized again", len(specs))
    return merged
