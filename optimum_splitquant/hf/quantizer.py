"""The transformers quantizer of SplitQuant, registered as ``quant_method="splitquant"``.

Thin by design: the layer kinds and model walks live in :mod:`optimum_splitquant.layers`, the
stored format and header checks in :mod:`optimum_splitquant.checkpoint`, the maths in
:mod:`optimum_splitquant.core`, releasing the float checkpoint's memory in :mod:`.memory`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer

from ..checkpoint.format import FORMAT_VERSION, QUANTIZED_TENSORS, layer_tensors
from ..checkpoint.headers import CheckpointIndex, check_consistency, header_metadata, read_checkpoint_index
from ..layers import dequantize_model, eligible_layers, layer_kind, replace_layers, resolve_modules_to_not_convert
from ..nn.compact import SplitQuantModule
from .config import QUANT_METHOD, SplitQuantConfig
from .memory import own_float_tensors

__all__ = ["QuantizeOnLoad", "SplitQuantHfQuantizer"]

logger = logging.getLogger(__name__)


class SplitQuantHfQuantizer(HfQuantizer):
    """Quantizes eligible layers as they stream in, or rebuilds them from a SplitQuant checkpoint."""

    requires_calibration = False

    def __init__(self, quantization_config: SplitQuantConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, SplitQuantConfig):
            raise TypeError(f"expected a SplitQuantConfig, got {type(quantization_config).__name__}")
        # A private copy: the resolved module list is written back without touching the caller's object.
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self.spec = self.quantization_config.to_spec()
        self.load_errors: dict[str, str] = {}

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def quantized_element_size(self) -> float:
        return self.spec.symbol_width / 8

    def param_needs_quantization(self, model: torch.nn.Module, param_name: str, **kwargs: Any) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        if tensor_name != "weight":
            return False
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, SplitQuantModule) and not module.is_quantized

    def get_quantize_ops(self) -> ConversionOps:
        return QuantizeOnLoad(self)

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        files = kwargs.get("checkpoint_files") or []
        index = read_checkpoint_index(files) if files else None
        if self.pre_quantized:
            names = self._quantized_names_from_checkpoint(model, index)
            replace_layers(model, self.spec, names, float_weight=False)
        else:
            if index is not None and index.quantized_modules():
                raise ValueError(
                    "this checkpoint already holds SplitQuant tensors but its config.json has no "
                    "quantization_config; restore it (the saved config.json) instead of quantizing again"
                )
            kept = resolve_modules_to_not_convert(model, self.quantization_config.modules_to_not_convert)
            names = [n for n in eligible_layers(model) if n not in set(kept)]
            replace_layers(model, self.spec, names, float_weight=True)
            self.quantization_config.modules_to_not_convert = kept
        logger.info(
            "SplitQuant: %d layers quantized (%d-bit, k=%d)", len(names), self.spec.bits, self.spec.num_clusters
        )

    def _quantized_names_from_checkpoint(self, model: torch.nn.Module, index: CheckpointIndex | None) -> list[str]:
        layers = eligible_layers(model)
        if index is None:
            kept = set(self.quantization_config.modules_to_not_convert or [])
            return [n for n in layers if n not in kept]
        check_consistency(index, FORMAT_VERSION, self.quantization_config.storage_settings())
        names = sorted(index.quantized_modules())
        unknown = [n for n in names if n not in layers]
        if unknown:
            raise ValueError(
                f"checkpoint holds SplitQuant tensors for {unknown[:5]} which are not Linear/Conv1D/Conv2d layers of "
                f"{type(model).__name__}; was it saved from another architecture?"
            )
        for name in names:
            self._check_layer_tensors(name, layers[name], index)
        return names

    def _check_layer_tensors(self, name: str, module: torch.nn.Module, index: CheckpointIndex) -> None:
        spec = self.spec
        kind = layer_kind(module)
        layer = kind.describe(module)
        rows, width = kind.dims(module)
        try:
            expected = layer_tensors(rows, width, spec, bias=module.bias is not None)
        except ValueError as exc:
            raise ValueError(f"{name} ({layer}): {exc}") from None
        settings = f"bits={spec.bits}, num_clusters={spec.num_clusters}, group_size={spec.group_size}"
        index.check_layer(name, expected, layer, settings)

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        if self.load_errors:
            details = "; ".join(f"{name}: {msg}" for name, msg in sorted(self.load_errors.items()))
            raise ValueError(f"could not quantize {len(self.load_errors)} layer(s): {details}")
        for name, module in model.named_modules():
            if not isinstance(module, SplitQuantModule) or hasattr(module, "_hf_hook"):
                continue
            if not module.is_quantized:
                raise ValueError(
                    f"{name}.weight was not found in the checkpoint, so layer {name!r} could not be quantized; "
                    f"add it to SplitQuantConfig(modules_to_not_convert=[...]) to keep it in float"
                )
            for buf in QUANTIZED_TENSORS:
                if getattr(module, buf).is_meta:
                    raise ValueError(f"{name}.{buf} was not loaded (still on the meta device)")
            if self.pre_quantized:
                try:
                    module.validate()
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        if not self.pre_quantized:
            own_float_tensors(model)
        return model

    def get_state_dict_and_metadata(self, model: torch.nn.Module) -> tuple[None, dict[str, str]]:
        settings = self.quantization_config.storage_settings()
        return None, {**header_metadata(FORMAT_VERSION, settings), "quant_method": QUANT_METHOD}

    def _dequantize(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
        return dequantize_model(model, dtype)


class QuantizeOnLoad(ConversionOps):
    """Load-time op: quantizes one float weight into its SplitQuant layer and drops the float copy."""

    def __init__(self, hf_quantizer: SplitQuantHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict[str, list[torch.Tensor]],
        model: torch.nn.Module | None = None,
        full_layer_name: str | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        (value,) = next(iter(input_dict.values()))
        module_name = full_layer_name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        try:
            module.quantize_(value)
        except (ValueError, TypeError) as exc:
            # transformers would fold an exception here into a generic RuntimeError; keep the
            # layer's own message and raise it once loading is done.
            self.hf_quantizer.load_errors[module_name] = str(exc)
        module._is_hf_initialized = True
        for buf in QUANTIZED_TENSORS:
            getattr(module, buf)._is_hf_initialized = True
        if missing_keys is not None:
            for tensor in ("weight", *QUANTIZED_TENSORS):
                missing_keys.discard(f"{module_name}.{tensor}")
        return {}
