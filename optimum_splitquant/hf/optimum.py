"""SplitQuant through optimum's quantizer interface: ``from_pretrained`` then ``quantize(save_dir)``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import transformers
from optimum.quantization_base import OptimumQuantizer
from transformers import PreTrainedModel

from .config import SplitQuantConfig
from .quantize_model import quantize_model

__all__ = ["SplitQuantizer", "model_class_for"]


class SplitQuantizer(OptimumQuantizer):
    """Optimum-style driver: ``SplitQuantizer.from_pretrained(model_or_path).quantize(save_dir, config)``."""

    def __init__(self, model_or_path: PreTrainedModel | str | os.PathLike) -> None:
        if not isinstance(model_or_path, (PreTrainedModel, str, os.PathLike)):
            raise TypeError(f"expected a PreTrainedModel or a model folder, got {type(model_or_path).__name__}")
        self.model_or_path = model_or_path

    @classmethod
    def from_pretrained(cls, model_or_path: PreTrainedModel | str | os.PathLike, file_name: str | None = None):
        """Wrap a float model (in memory or a local/Hub folder) for quantization."""
        if file_name is not None:
            raise ValueError("file_name is not used: SplitQuant loads the folder's safetensors weights")
        return cls(model_or_path)

    def quantize(
        self,
        save_dir: str | os.PathLike,
        file_prefix: str | None = None,
        quantization_config: SplitQuantConfig | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Quantize, save to ``save_dir`` with ``save_pretrained`` and return the quantized model."""
        if file_prefix is not None:
            raise ValueError("file_prefix is not supported: the checkpoint is saved with save_pretrained's names")
        config = quantization_config or SplitQuantConfig()
        if isinstance(self.model_or_path, PreTrainedModel):
            model = quantize_model(self.model_or_path, config)
        else:
            model_cls = model_class_for(self.model_or_path)
            model = model_cls.from_pretrained(self.model_or_path, quantization_config=config, **kwargs)
        model.save_pretrained(save_dir)
        return model


def model_class_for(path: str | os.PathLike) -> type[PreTrainedModel]:
    """The class named by ``architectures`` in the folder's config.json (looked up by name, never evaluated)."""
    config_file = Path(path) / "config.json"
    architectures = []
    if config_file.is_file():
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    if architectures:
        cls = getattr(transformers, str(architectures[0]), None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return transformers.AutoModel
