"""PEFT's LoRA and ``modules_to_save`` layers over SplitQuant layers, and LoRA's dispatcher for them.

:class:`SplitQuantLoraLinear` adapts a :class:`~optimum_splitquant.nn.SplitQuantLinear` (a frozen
packed base, float adapters, merges through the float layer it replaced);
:class:`SplitQuantModulesToSave` gives each adapter a float copy of a module holding SplitQuant
layers. See :mod:`optimum_splitquant.hf.peft` for how PEFT reaches them.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ...layers import dequantize_model, layer_kind
from ...nn.compact import SplitQuantModule
from ...nn.conv import SplitQuantConv2d
from ...nn.linear import SplitQuantLinear

__all__ = [
    "READ_ONLY_INITS",
    "SplitQuantLoraLinear",
    "SplitQuantModulesToSave",
    "dispatch_splitquant",
    "reject_conv2d",
    "weights_in_buffers",
]

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


def _float_copy(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A copy of ``module`` in which every SplitQuant layer is the float layer it replaced (in ``dtype``)."""
    if isinstance(module, SplitQuantModule):
        return layer_kind(module).to_float(module, dtype)
    return dequantize_model(copy.deepcopy(module), dtype)


def holds_splitquant(module: nn.Module) -> bool:
    return any(isinstance(m, SplitQuantModule) for m in module.modules())


class SplitQuantModulesToSave(ModulesToSaveWrapper):
    """PEFT's ``modules_to_save`` wrapper over a module holding SplitQuant layers: float copies that train.

    ``original_module`` keeps the packed layers (it runs while no adapter of this module is active);
    each adapter's entry of ``modules_to_save`` is a copy in which every SplitQuant layer is the float
    layer it replaced, holding the dequantized weight in ``dtype`` (``None``: the layer's own float
    dtype). PEFT saves and loads those copies as for any float module.
    """

    copy_dtype: torch.dtype | None

    def __init__(
        self, module_to_save: nn.Module, adapter_name: str, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> None:
        object.__setattr__(self, "copy_dtype", dtype)  # read by update(), which the base __init__ calls
        super().__init__(module_to_save, adapter_name, **kwargs)

    def update(self, adapter_name: str, tied_module: nn.Module | None = None, **kwargs: Any) -> None:
        """Give ``adapter_name`` its float copy (once), then let PEFT set it up as usual."""
        if tied_module is not None:
            kwargs["tied_module"] = tied_module
        elif adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = _float_copy(self.original_module, self.copy_dtype)
        super().update(adapter_name, **kwargs)


def reject_conv2d(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module:
    name = kwargs.get("target_name") or type(_base(target)).__name__
    raise TypeError(
        f"LoRA on SplitQuantConv2d ({name}) is not supported: leave it out of target_modules, or keep it in "
        "float with SplitQuantConfig(modules_to_not_convert=[...])"
    )


def dispatch_splitquant(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module | None:
    """PEFT LoRA dispatcher: a :class:`SplitQuantLoraLinear` over a SplitQuant linear ``target``, else ``None``.

    Raises ``TypeError`` for a :class:`SplitQuantConv2d` target. ``kwargs`` are PEFT's (``r``,
    ``lora_alpha``, ``target_name``, ...).
    """
    if kwargs.pop("parameter_name", None) is not None:
        return None  # target_parameters: PEFT's ParamWrapper, for float parameters only
    base = _base(target)
    if isinstance(base, SplitQuantLinear):
        return SplitQuantLoraLinear(target, adapter_name, config, **kwargs)
    if isinstance(base, SplitQuantConv2d):
        reject_conv2d(target, adapter_name, config, **kwargs)
    return None


def weights_in_buffers(model: nn.Module) -> int:
    """How many weights ``model``'s SplitQuant layers hold in buffers (``out_features * in_features`` each)."""
    return sum(
        m.out_features * m.in_features
        for m in model.modules()
        if isinstance(m, SplitQuantModule) and "weight" not in m._parameters  # a float placeholder is counted
    )
