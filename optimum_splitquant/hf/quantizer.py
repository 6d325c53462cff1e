"""The transformers quantizer of SplitQuant, registered as ``quant_method="splitquant"``.

Thin by design: the layer kinds and model walks live in :mod:`optimum_splitquant.layers`, the
stored format and header checks in :mod:`optimum_splitquant.checkpoint`, the maths in
:mod:`optimum_splitquant.core`, releasing the float checkpoint's memory in :mod:`.memory`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import re
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer

from ..checkpoint.format import (
    FORMAT_VERSION,
    PACKED,
    coded_version,
    format_version,
    layer_tensors,
    stored_tensors,
)
from ..checkpoint.headers import (
    CheckpointIndex,
    check_consistency,
    check_scale_dtype,
    header_metadata,
    read_checkpoint_index,
)
from ..core.spec import SCALE_DTYPES
from ..layers import dequantize_model, eligible_layers, layer_kind, replace_layers, resolve_modules_to_not_convert
from ..nn.compact import SplitQuantModule, validate_layers
from ..report import log_quality
from .config import QUANT_METHOD, SplitQuantConfig
from .key_mapping import checkpoint_key_renamer, module_renamer, outside_base_model
from .memory import own_float_tensors, release_file_pages, return_freed_heap

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
        self.load_dtype: torch.dtype | None = None
        # SplitQuant layers rebuilt from a checkpoint: name in the checkpoint -> name in the model.
        self.loaded_layers: dict[str, str] = {}
        self._index: CheckpointIndex | None = None
        self._pending: list[str] = []  # checkpoint layers not found in the model yet
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
        if self._index is not None and model is not None:
            # The conversions now include a `key_mapping` given to from_pretrained (one renaming per
            # entry, beside the model's own): layers whose stored names only it maps into the model are
            # rebuilt here (the model is still on the meta device). Without one, they are the model's own
            # conversions, which rebuilt the layers before loading.
            model_conversions = [c for c in conversions if not LayerTensors.used_by(c)]
            if len(model_conversions) != len(get_model_conversion_mapping(model)):
                self._rebuild_layers(model, checkpoint_key_renamer(model, model_conversions))
            if self._pending:
                raise self._unknown_layers(model, self._pending, module_renamer(checkpoint_key_renamer(model)))
        return conversions

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        self._loading_model = weakref.ref(model)  # a weak reference: the model holds this quantizer
        files = kwargs.get("checkpoint_files") or []
        index = read_checkpoint_index(files) if files else None
        if self.pre_quantized and index is not None:
            names = self._rebuild_from_checkpoint(model, index)
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

    def _rebuild_from_checkpoint(self, model: torch.nn.Module, index: CheckpointIndex) -> list[str]:
        """Check the checkpoint's headers, then rebuild its SplitQuant layers; returns their names in the model."""
        check_consistency(
            index, FORMAT_VERSION, self.quantization_config.storage_settings(), coded_version=coded_version(self.spec)
        )
        check_scale_dtype(index, self.quantization_config.scale_dtype, _SCALE_DTYPE_FIELD)
        self._index, self._pending = index, sorted(index.quantized_modules())
        rename = checkpoint_key_renamer(model)
        module, layers = module_renamer(rename), eligible_layers(model)
        outside = outside_base_model(model, self._pending, [s for s in self._pending if module(s) not in layers])
        if outside:
            logger.info(
                "SplitQuant: %d quantized layer(s) of the checkpoint lie outside %s (a task head) and are not "
                "loaded: %s",
                len(outside),
                type(model).__name__,
                outside[:5],
            )
            self._pending = [s for s in self._pending if s not in outside]
        self._rebuild_layers(model, rename)
        return sorted(self.loaded_layers.values())

    def _rebuild_layers(self, model: torch.nn.Module, rename: Callable[[str], str]) -> None:
        """Replace the model's layers that the checkpoint stores in SplitQuant form, under the loader's names.

        ``rename`` gives a checkpoint key its name in the model (:func:`checkpoint_key_renamer`). A
        layer found earlier must keep its name; layers not found stay pending.
        """
        module = module_renamer(rename)
        for stored, name in sorted(self.loaded_layers.items()):
            if module(stored) != name:
                raise ValueError(
                    f"the key mapping of this load renames the SplitQuant layer stored as {stored!r} to "
                    f"{module(stored)!r}, but it was rebuilt as {name!r} from the model's own key conversions; "
                    "drop key_mapping, or save the model again under the new names"
                )
        layers = eligible_layers(model)
        found = {s: module(s) for s in self._pending if module(s) in layers}
        if not found:
            return
        index = self._index.renamed(rename)
        for name in found.values():
            self._check_layer_tensors(name, layers[name], index)
        replace_layers(model, self.spec, list(found.values()), float_weight=False)
        self.loaded_layers.update(found)
        self._pending = [s for s in self._pending if s not in found]

    @staticmethod
    def _unknown_layers(model: torch.nn.Module, stored: list[str], module: Callable[[str], str]) -> ValueError:
        shown = [s if module(s) == s else f"{s} (loads as {module(s)})" for s in stored[:5]]
        return ValueError(
            f"checkpoint holds SplitQuant tensors for {shown} which are not Linear/Conv1D/Conv2d layers of "
            f"{type(model).__name__}; was it saved from another architecture?"
        )

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
        if self._pending:  # the loader never showed its key conversions: nothing matched these layers
            raise self._unknown_layers(model, self._pending, module_renamer(checkpoint_key_renamer(model)))
        self._index = None  # loading is over: later conversion look-ups (adapters) must not re-resolve layers
        if self.load_errors:
            details = "; ".join(f"{name}: {msg}" for name, msg in sorted(self.load_errors.items()))
            raise ValueError(f"could not quantize {len(self.load_errors)} layer(s): {details}")
        loaded: dict[str, SplitQuantModule] = {}
        offloaded: dict[str, SplitQuantModule] = {}  # stored tensors held by an offload hook (disk or CPU)
        for name, module in model.named_modules():
            if not isinstance(module, SplitQuantModule):
                continue
            if not module.is_quantized:
                raise ValueError(
                    f"{name}.weight was not found in the checkpoint, so layer {name!r} could not be quantized; "
                    f"add it to SplitQuantConfig(modules_to_not_convert=[...]) to keep it in float"
                )
            on_meta = [buf for buf in stored_tensors(module.spec) if getattr(module, buf).is_meta]
            if on_meta and _offloaded_weights(module) is not None:
                offloaded[name] = module
                continue
            if on_meta:
                raise ValueError(f"{name}.{on_meta[0]} was not loaded (still on the meta device)")
            # transformers sets the non-persistent buffers (here the decoded ranges) after loading: rebuild them.
            module.rebuild_ranges_()
            loaded[name] = module
        if self.pre_quantized:
            validate_layers(loaded, self.load_dtype)
            for name, module in offloaded.items():  # one layer in memory at a time
                with _onloaded(name, module):
                    validate_layers({name: module}, self.load_dtype)
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
        found: dict[torch.dtype, str] = {}
        for name, module in model.named_modules():
            if isinstance(module, SplitQuantModule) and module.is_quantized:
                for buf in stored_tensors(module.spec):  # the scales and offsets, or the range steps
                    if getattr(module, buf).is_floating_point():
                        found.setdefault(getattr(module, buf).dtype, name)
        if not found:
            return
        names = {dtype: key for key, dtype in SCALE_DTYPES.items()}
        if len(found) > 1 or next(iter(found)) not in names:
            shown = ", ".join(f"{dtype} (e.g. {layer})" for dtype, layer in found.items())
            raise ValueError(
                f"cannot save: SplitQuant scales and offsets are held in {shown}; a checkpoint stores them in one "
                f"of {sorted(SCALE_DTYPES)}: cast the model with model.to(dtype) first"
            )
        scale_dtype = names[next(iter(found))]
        if scale_dtype != self.quantization_config.scale_dtype:
            logger.info("SplitQuant: scales are held in %s (the model was cast); saved as such", scale_dtype)
            self.quantization_config.scale_dtype = scale_dtype


def _offloaded_weights(module: torch.nn.Module) -> Mapping[str, torch.Tensor] | None:
    """The tensors an offload hook holds for ``module`` off the model, by name, or None.

    accelerate's ``AlignDevicesHook`` (``device_map`` with ``"disk"``, or ``"cpu"`` beside an accelerator)
    leaves the module's tensors on the meta device and reads them from its ``weights_map`` (the offload
    folder, the checkpoint files, or a CPU state dict) for each forward. Duck-typed: accelerate stays optional.
    """
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", (hook,)):  # a SequentialHook chains several
        weights = getattr(candidate, "weights_map", None)
        if getattr(candidate, "offload", False) and weights is not None:
            return weights
    return None


@contextlib.contextmanager
def _onloaded(name: str, module: SplitQuantModule) -> Iterator[None]:
    """Within the block, ``module`` holds its offloaded stored tensors; afterwards it is as it was.

    Only the stored tensors are read (not the bias); the ranges decoded from coded ones meanwhile are
    dropped again, so the layer keeps no memory the offload meant to spare.
    """
    weights = _offloaded_weights(module)
    buffers = dict(module._buffers)
    ranges_from = module.__dict__.get("_ranges_from")
    try:
        for buf in stored_tensors(module.spec):
            if module._buffers[buf].is_meta:
                try:
                    module._buffers[buf] = weights[buf]
                except KeyError:
                    raise ValueError(
                        f"{name}.{buf} was not loaded (on the meta device, and not among the offloaded weights)"
                    ) from None
        yield
    finally:
        module._buffers.clear()
        module._buffers.update(buffers)
        if ranges_from is None:
            module.__dict__.pop("_ranges_from", None)
        else:
            module._ranges_from = ranges_from


class QuantizeOnLoad(ConversionOps):
    """Load-time op: quantizes one float weight into its SplitQuant layer and drops the float copy.

    The float weight's pages of the checkpoint's file map and the heap freed by quantizing go back to
    the OS at once (:mod:`.memory`), so that a load holds one layer's float weight at a time.
    """

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
        release_file_pages(value)
        return_freed_heap()
        module._is_hf_initialized = True
        for buf in module._buffers.values():
            buf._is_hf_initialized = True
        if missing_keys is not None:
            for tensor in ("weight", *stored_tensors(module.spec)):
                missing_keys.discard(f"{module_name}.{tensor}")
        return {}


class LayerTensors(ConversionOps):
    """Load-time grouping of one layer's SplitQuant tensors: handed on unchanged, under their own names.

    transformers builds one key transform per checkpoint tensor that no conversion matches (a regex
    compiled for each); matched by this one conversion, a layer's three tensors cost one. Saving
    reverses it into the same pass-through.
    """

    def convert(self, input_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return input_dict

    @property
    def reverse_op(self) -> ConversionOps:
        return self

    @staticmethod
    def used_by(conversion: Any) -> bool:
        return any(isinstance(op, LayerTensors) for op in getattr(conversion, "operations", ()))

    def __deepcopy__(self, memo: dict[int, Any]) -> LayerTensors:
        return LayerTensors()  # no state


class LayerConverter(WeightConverter):
    """The conversion of :class:`LayerTensors`, cheap to deep-copy.

    transformers deep-copies the matching conversion for every checkpoint key (three per layer) and
    keeps one copy per layer. A generic ``deepcopy`` walks every attribute (about 40 us each, 24 ms
    for SmolLM2's 630 tensors); this copies the mutable containers and shares the immutable parts
    (strings, the compiled pattern).
    """

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> LayerConverter:
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name in _slot_names(type(self)):
            try:
                value = getattr(self, name)
            except AttributeError:
                continue
            object.__setattr__(new, name, _copied(value, memo))
        return new


@functools.cache
def _slot_names(cls: type) -> tuple[str, ...]:
    return tuple(name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ()))


def _copied(value: Any, memo: dict[int, Any]) -> Any:
    """A deep copy of ``value``: immutable values shared, empty containers made anew, the rest deep-copied."""
    if value is None or isinstance(value, (str, int, float, bool, re.Pattern)):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, defaultdict) and not value:
        return defaultdict(value.default_factory)
    return copy.deepcopy(value, memo)
