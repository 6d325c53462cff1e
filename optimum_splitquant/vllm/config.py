"""``SplitQuantVllmConfig``: the vLLM ``QuantizationConfig`` of ``quant_method="splitquant"``.

Built from the checkpoint's ``quantization_config`` (the dict ``config.json`` holds), validated by
:class:`~optimum_splitquant.hf.config.SplitQuantConfig` and turned into the layers'
:class:`~optimum_splitquant.core.QuantSpec`. Which layers are quantized comes from the checkpoint
itself when vLLM serves a local folder (the safetensors headers, checked as the transformers loader
checks them: one save, the settings of ``config.json``, a known format version, and for coded ranges
or column scales the version ``config.json`` names, 4 for column scales); otherwise from
``modules_to_not_convert``. Every other layer gets vLLM's ``UnquantizedLinearMethod``.

vLLM fuses some layers (``qkv_proj`` from ``q_proj``/``k_proj``/``v_proj``, ``gate_up_proj`` from
``gate_proj``/``up_proj``, per the model's ``packed_modules_mapping``); a fused layer is quantized
when all its parts are, and refused when only some are.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ..checkpoint.format import FORMAT_VERSION, coded_version
from ..checkpoint.headers import check_consistency, check_scale_dtype, read_checkpoint_index
from ..hf.config import QUANT_METHOD, SplitQuantConfig
from .method import SplitQuantLinearMethod

__all__ = ["SplitQuantVllmConfig", "register_config"]

logger = logging.getLogger(__name__)


class SplitQuantVllmConfig(QuantizationConfig):
    """SplitQuant settings of one checkpoint, and which of its layers are stored quantized."""

    def __init__(self, config: SplitQuantConfig) -> None:
        super().__init__()
        self.config = config
        self.spec = config.to_spec()
        self.modules_to_not_convert: list[str] = list(config.modules_to_not_convert or [])
        # Module names (in the checkpoint's naming) holding SplitQuant tensors; None until read from a local folder.
        self.quantized_modules: set[str] | None = None

    def __repr__(self) -> str:
        return f"SplitQuantVllmConfig({self.config.to_dict()})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # pure torch everywhere; Triton and the CPU kernels are optional fast paths

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the settings live in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SplitQuantVllmConfig:
        try:
            return cls(SplitQuantConfig(**config))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config.json quantization_config (quant_method 'splitquant'): {exc}") from None

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Read which layers are quantized from a local folder's safetensors headers (checked before any load)."""
        folder = Path(model_name)
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if not files:
            logger.info(
                "SplitQuant: %s is not a local folder of safetensors files; quantized layers are those not in "
                "modules_to_not_convert",
                model_name,
            )
            return
        index = read_checkpoint_index(files)
        check_consistency(index, FORMAT_VERSION, self.config.storage_settings(), coded_version=coded_version(self.spec))
        check_scale_dtype(index, self.config.scale_dtype, "config.json quantization_config.scale_dtype")
        self.quantized_modules = index.quantized_modules()

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Rename the module lists into the vLLM model's names (models whose names differ from the checkpoint's)."""
        self.modules_to_not_convert = hf_to_vllm_mapper.apply_list(self.modules_to_not_convert)
        if self.quantized_modules is not None:
            self.quantized_modules = set(hf_to_vllm_mapper.apply_list(sorted(self.quantized_modules)))

    def is_quantized(self, name: str) -> bool:
        """Whether module ``name`` (one stored module, not a fused one) holds SplitQuant tensors."""
        if self.quantized_modules is not None:
            return name in self.quantized_modules
        return not any(name == m or name.startswith(f"{m}.") for m in self.modules_to_not_convert)

    def stored_parts(self, prefix: str) -> list[str]:
        """The stored module names a vLLM layer ``prefix`` is built from (several for a fused layer)."""
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf)
        if not parts:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        parts = self.stored_parts(prefix)
        quantized = [self.is_quantized(p) for p in parts]
        if not isinstance(layer, LinearBase):
            if any(quantized) and self.quantized_modules is not None:
                raise ValueError(
                    f"SplitQuant: the checkpoint stores {prefix!r} quantized, but vLLM builds it as a "
                    f"{type(layer).__name__}, which this plugin serves only in float; quantize the model again "
                    f"with modules_to_not_convert=[..., {prefix!r}]"
                )
            return None  # embeddings, the LM head and attention stay as vLLM makes them
        if all(quantized):
            return SplitQuantLinearMethod(self.spec, prefix)
        if not any(quantized):
            return UnquantizedLinearMethod()
        mixed = ", ".join(f"{p} ({'quantized' if q else 'float'})" for p, q in zip(parts, quantized, strict=True))
        raise ValueError(
            f"SplitQuant: vLLM fuses {mixed} into one layer {prefix!r}, which cannot hold quantized and float "
            "parts; quantize the model again with all of them in modules_to_not_convert, or none"
        )


def register_config() -> None:
    """Register :class:`SplitQuantVllmConfig` under ``"splitquant"`` (vLLM overwrites a repeated registration)."""
    register_quantization_config(QUANT_METHOD)(SplitQuantVllmConfig)
