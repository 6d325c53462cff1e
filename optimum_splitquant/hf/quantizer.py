"""The transformers quantizer of SplitQuant, registered as ``quant_method="splitquant"``.

Thin by design: each hook of :class:`SplitQuantHfQuantizer` delegates. The load-time conversion ops
live in :mod:`.load_ops`, matching a checkpoint's layers to the model in :mod:`.checkpoint_layers`,
the checks of the loaded layers in :mod:`.loaded`, releasing the float checkpoint's memory in
:mod:`.memory`; the layer kinds and model walks in :mod:`optimum_splitquant.layers`, the stored
format and header checks in :mod:`optimum_splitquant.checkpoint`, the maths in
:mod:`optimum_splitquant.core`.
"""

from __future__ import annotations

import copy
import inspect
import logging
import weakref
from typing import Any

import torch
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer

from ..checkpoint.format import FORMAT_VERSION, PACKED, coded_version, format_version, stored_tensors
from ..checkpoint.headers import check_consistency, check_scale_dtype, header_metadata, read_checkpoint_index
from ..layers import dequantize_model, eligible_layers, replace_layers, resolve_modules_to_not_convert
from ..nn.compact import SplitQuantModule
from ..report import log_quality
from .checkpoint_layers import CheckpointLayers
from .config import QUANT_METHOD, SplitQuantConfig
from .key_mapping import checkpoint_key_renamer
from .load_ops import LayerConverter, LayerTensors, QuantizeOnLoad
from .loaded import gather_layers, held_scale_dtype, validate_loaded
from .memory import HeapReturner, own_float_tensors

__all__ = ["LayerTensors", "QuantizeOnLoad", "SplitQuantHfQuantizer"]

logger = logging.getLogger(__name__)

_SCALE_DTYPE_FIELD = "config.json quantization_config.scale_dtype"

_BASE_TAKES_MODEL = "model" in inspect.signature(HfQuantizer.update_weight_conversions).parameters
"""transformers >= 5.21 passes the model to ``update_weight_conversions``; 5.16 to 5.20 pass the conversions alone."""


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
        self.heap = HeapReturner()  # returns the freed heap once the resident memory has grown
        self.load_dtype: torch.dtype | None = None
        # SplitQuant layers rebuilt from a checkpoint: name in the checkpoint -> name in the model.
        self.loaded_layers: dict[str, str] = {}
        self._checkpoint: CheckpointLayers | None = None  # while a SplitQuant checkpoint loads
        self._loading_model: weakref.ref[torch.nn.Module] | None = None

    @property
    def is_trainable(self) -> bool:
        """Adapters (LoRA, :mod:`optimum_splitquant.hf.peft`) train on top; the packed weights stay frozen."""
        return True

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

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # The dtype the model computes in: every rebuilt weight must be representable in it.
        self.load_dtype = dtype
        return dtype

    def get_weight_conversions(self) -> list:
        """Loading a checkpoint: one conversion per layer for its SplitQuant tensors (see :class:`LayerTensors`)."""
        if not self.pre_quantized:
            return []
        return [LayerConverter(list(stored_tensors(self.spec)), PACKED, [LayerTensors()])]

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        if LayerTensors.used_by(converter):
            return None  # codes, scales and offsets load as stored (the headers were checked against the config)
        return super().get_new_dtype(converter, param, dtype)

    def update_weight_conversions(self, weight_conversions: list, model: torch.nn.Module | None = None) -> list:
        # transformers < 5.21 calls this without the model (see _BASE_TAKES_MODEL); the model is then the one
        # being loaded, remembered by _process_model_before_weight_loading.
        if model is None:
            model = self._loading_model() if self._loading_model is not None else None
        if _BASE_TAKES_MODEL:
            conversions = super().update_weight_conversions(weight_conversions, model)
        else:
            conversions = super().update_weight_conversions(weight_conversions)
        if self._checkpoint is not None and model is not None:
            # The conversions now include a `key_mapping` given to from_pretrained (one renaming per
            # entry, beside the model's own): layers whose stored names only it maps into the model are
            # rebuilt here (the model is still on the meta device). Without one, they are the model's own
            # conversions, which rebuilt the layers before loading.
            model_conversions = [c for c in conversions if not LayerTensors.used_by(c)]
            if len(model_conversions) != len(get_model_conversion_mapping(model)):
                self._checkpoint.rebuild(model, checkpoint_key_renamer(model, model_conversions))
            if self._checkpoint.pending:
                raise self._checkpoint.unknown_layers(model)
        return conversions

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        self._loading_model = weakref.ref(model)  # a weak reference: the model holds this quantizer
        files = kwargs.get("checkpoint_files") or []
        index = read_checkpoint_index(files) if files else None
        if self.pre_quantized and index is not None:
            check_consistency(
                index,
                FORMAT_VERSION,
                self.quantization_config.storage_settings(),
                coded_version=coded_version(self.spec),
            )
            check_scale_dtype(index, self.quantization_config.scale_dtype, _SCALE_DTYPE_FIELD)
            names = self._rebuild_from_checkpoint(model, CheckpointLayers(index, self.spec, self.loaded_layers))
        elif self.pre_quantized:  # no files to read (a state dict): the config names the float layers
            kept = set(self.quantization_config.modules_to_not_convert or [])
            names = replace_layers(
                model, self.spec, [n for n in eligible_layers(model) if n not in kept], float_weight=False
            )
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
            "SplitQuant: %d layers %s (%d-bit, k=%d)",
            len(names),
            "read from the checkpoint" if self.pre_quantized else "to quantize as they load",
            self.spec.bits,
            self.spec.num_clusters,
        )

    def _rebuild_from_checkpoint(self, model: torch.nn.Module, checkpoint: CheckpointLayers) -> list[str]:
        """Rebuild the checkpoint's SplitQuant layers found in ``model``; returns their names in the model."""
        self._checkpoint = checkpoint
        rename = checkpoint_key_renamer(model)
        outside = checkpoint.skip_outside(model, rename)
        if outside:
            logger.info(
                "SplitQuant: %d quantized layer(s) of the checkpoint lie outside %s (a task head) and are not "
                "loaded: %s",
                len(outside),
                type(model).__name__,
                outside[:5],
            )
        checkpoint.rebuild(model, rename)
        return sorted(self.loaded_layers.values())

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        if self._checkpoint is not None and self._checkpoint.pending:
            # the loader never showed its key conversions: nothing matched these layers
            raise self._checkpoint.unknown_layers(model)
        self._checkpoint = None  # loading is over: later conversion look-ups (adapters) must not re-resolve layers
        if self.load_errors:
            details = "; ".join(f"{name}: {msg}" for name, msg in sorted(self.load_errors.items()))
            raise ValueError(f"could not quantize {len(self.load_errors)} layer(s): {details}")
        loaded, offloaded = gather_layers(model)
        if self.pre_quantized:
            validate_loaded(loaded, offloaded, self.load_dtype)
        else:
            log_quality(model, logger)  # the summary at INFO; a warning below the usable floor
            own_float_tensors(model)  # copies what stays float, so that the float file's map can go
        return model

    def get_state_dict_and_metadata(self, model: torch.nn.Module) -> tuple[None, dict[str, str]]:
        self._record_scale_dtype(model)
        settings = self.quantization_config.storage_settings()
        return None, {**header_metadata(format_version(self.spec), settings), "quant_method": QUANT_METHOD}

    def _dequantize(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
        return dequantize_model(model, dtype)

    def _record_scale_dtype(self, model: torch.nn.Module) -> None:
        """Make ``scale_dtype`` name the dtype the scales are saved in (``model.to(dtype)`` casts them).

        Runs before ``config.json`` is written, so the config and the tensors always agree.
        """
        scale_dtype = held_scale_dtype(model)
        if scale_dtype is not None and scale_dtype != self.quantization_config.scale_dtype:
            logger.info("SplitQuant: scales are held in %s (the model was cast); saved as such", scale_dtype)
            self.quantization_config.scale_dtype = scale_dtype
