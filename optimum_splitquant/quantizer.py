"""The transformers quantizer of SplitQuant, registered as ``quant_method="splitquant"``.

Thin by design: module selection and swapping live in :mod:`.replace`, header checks in
:mod:`.checkpoint`, the maths in :mod:`.core`.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import logging
import sys
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer

from .checkpoint import CheckpointIndex, check_consistency, header_metadata, read_checkpoint_index
from .config import FORMAT_VERSION, QUANT_METHOD, SplitQuantConfig
from .core.packing import packed_row_bytes
from .nn.linear import SplitQuantLinear
from .replace import dequantize_model, eligible_layers, layer_dims, replace_layers, resolve_modules_to_not_convert

__all__ = ["SplitQuantHfQuantizer", "SplitQuantQuantize"]

logger = logging.getLogger(__name__)

_BUFFERS = ("weight_packed", "weight_scale", "weight_offset")
_SCALE_DTYPES = ("F16", "BF16", "F32")
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


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
        return isinstance(module, SplitQuantLinear) and not module.is_quantized

    def get_quantize_ops(self) -> ConversionOps:
        return SplitQuantQuantize(self)

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        files = kwargs.get("checkpoint_files") or []
        index = read_checkpoint_index(files) if files else None
        if self.pre_quantized:
            names = self._quantized_names_from_checkpoint(model, index)
            replace_layers(model, self.spec, names, float_weight=False)
        else:
            if index is not None and index.module_names_with("weight_packed"):
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
        names = sorted(index.module_names_with("weight_packed"))
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
        in_f, out_f, source = layer_dims(module)
        if source == "conv2d":
            # One packed row per output kernel, of in_channels / groups * kh * kw weights.
            layer = (
                f"Conv2d({module.in_channels}, {module.out_channels}, kernel_size={tuple(module.kernel_size)}, "
                f"groups={module.groups}): {out_f} kernels of {in_f} weights"
            )
        else:
            layer = f"{type(module).__name__}({in_f} -> {out_f})"
        try:
            groups = spec.num_groups(in_f) if in_f else 1
        except ValueError as exc:
            raise ValueError(f"{name} ({layer}): {exc}") from None
        expected = {
            "weight_packed": ((out_f, packed_row_bytes(in_f, spec.symbol_width)), ("U8",)),
            "weight_scale": ((out_f, groups, spec.num_clusters), _SCALE_DTYPES),
            "weight_offset": ((out_f, groups, spec.num_clusters), _SCALE_DTYPES),
        }
        if module.bias is not None:
            expected["bias"] = ((out_f,), _SCALE_DTYPES)
        for tensor, (shape, dtypes) in expected.items():
            key = f"{name}.{tensor}"
            info = index.tensors.get(key)
            if info is None:
                raise ValueError(f"SplitQuant checkpoint is missing tensor {key!r}; the checkpoint is incomplete")
            if info.shape != shape or info.dtype not in dtypes:
                raise ValueError(
                    f"tensor {key!r} in {info.file} has shape {list(info.shape)} and dtype {info.dtype}; "
                    f"expected shape {list(shape)} and dtype in {list(dtypes)} for {layer} with bits={spec.bits}, "
                    f"num_clusters={spec.num_clusters}, group_size={spec.group_size}"
                )
        if f"{name}.weight" in index.tensors:
            raise ValueError(f"checkpoint holds both a float {name}.weight and SplitQuant tensors for {name!r}")

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        if self.load_errors:
            details = "; ".join(f"{name}: {msg}" for name, msg in sorted(self.load_errors.items()))
            raise ValueError(f"could not quantize {len(self.load_errors)} layer(s): {details}")
        for name, module in model.named_modules():
            if not isinstance(module, SplitQuantLinear) or hasattr(module, "_hf_hook"):
                continue
            if not module.is_quantized:
                raise ValueError(
                    f"{name}.weight was not found in the checkpoint, so layer {name!r} could not be quantized; "
                    f"add it to SplitQuantConfig(modules_to_not_convert=[...]) to keep it in float"
                )
            for buf in _BUFFERS:
                if getattr(module, buf).is_meta:
                    raise ValueError(f"{name}.{buf} was not loaded (still on the meta device)")
            if self.pre_quantized:
                try:
                    module.validate()
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        if not self.pre_quantized:
            _own_float_tensors(model)
        return model

    def get_state_dict_and_metadata(self, model: torch.nn.Module) -> tuple[None, dict[str, str]]:
        settings = self.quantization_config.storage_settings()
        return None, {**header_metadata(FORMAT_VERSION, settings), "quant_method": QUANT_METHOD}

    def _dequantize(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
        return dequantize_model(model, dtype)


class SplitQuantQuantize(ConversionOps):
    """Load-time op: quantizes one float weight into its ``SplitQuantLinear`` and drops the float copy."""

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
        for buf in _BUFFERS:
            getattr(module, buf)._is_hf_initialized = True
        if missing_keys is not None:
            for tensor in ("weight", *_BUFFERS):
                missing_keys.discard(f"{module_name}.{tensor}")
        return {}


def _own_float_tensors(model: torch.nn.Module) -> None:
    """Give the float parameters and buffers left on the CPU their own memory.

    Loaded from safetensors they are views into the memory-mapped float checkpoint, which keeps the
    whole mapping alive, and quantizing at load has read every page of it: the process would go on
    holding the full float file in its resident memory. A copy of what stays float (embeddings,
    norms, the head) lets the mapping go. Tied parameters stay tied (one copy per tensor).
    """
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, SplitQuantLinear):
            params = {n: p for n, p in module._parameters.items() if n == "bias"}
        else:
            params = module._parameters
        for name, param in list(params.items()):
            if param is None or param.device.type != "cpu":
                continue
            if id(param) not in copies:
                copies[id(param)] = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            module._parameters[name] = copies[id(param)]
        if isinstance(module, SplitQuantLinear):
            continue
        for name, buf in list(module._buffers.items()):
            if buf is None or buf.device.type != "cpu":
                continue
            if id(buf) not in copies:
                copies[id(buf)] = buf.clone()
            module._buffers[name] = copies[id(buf)]
    copies.clear()
    gc.collect()
    _return_freed_heap()


def _return_freed_heap() -> None:
    """Hand the float copies freed while quantizing back to the OS (glibc keeps them otherwise)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to do
        logger.debug("malloc_trim is not available")
