"""SplitQuant through optimum's quantizer interface: ``from_pretrained`` then ``quantize(save_dir)``.

``quantize`` saves the quantized model and, beside it, the source model's tokenizer or processor
(image processor, feature extractor) when the source has one, so that ``pipeline(model=save_dir)``
and evaluation harnesses can use the folder as it is. The generation config goes with the model
(``save_pretrained`` writes it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import transformers
from optimum.quantization_base import OptimumQuantizer
from transformers import AutoProcessor, AutoTokenizer, PreTrainedModel
from transformers.utils import has_file

from .config import SplitQuantConfig
from .quantize_model import quantize_model

__all__ = ["PROCESSOR_FILES", "TOKENIZER_FILES", "SplitQuantizer", "model_class_for", "save_preprocessing"]

logger = logging.getLogger(__name__)

# Files that show a model folder (or Hub repository) has a tokenizer, or a processor, image processor or
# feature extractor. They are looked for before anything loads: transformers 5 builds an empty
# tokenizer for a folder that has none, rather than failing.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
# ``quantize`` keyword arguments that also say where the preprocessing files are.
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")


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
        with_preprocessing: bool = True,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Quantize, save to ``save_dir`` with ``save_pretrained`` and return the quantized model.

        With ``with_preprocessing`` (the default), the tokenizer or processor of the source is saved
        too (:func:`save_preprocessing`): the folder or Hub id given, or for a model in memory its
        ``name_or_path`` (as ``pipeline`` finds a tokenizer for a model object). ``kwargs`` go to the
        model's ``from_pretrained`` (``revision``, ``token``, ``cache_dir``, ``local_files_only`` and
        ``trust_remote_code`` also to the tokenizer's).
        """
        if file_prefix is not None:
            raise ValueError("file_prefix is not supported: the checkpoint is saved with save_pretrained's names")
        config = quantization_config or SplitQuantConfig()
        if isinstance(self.model_or_path, PreTrainedModel):
            source = self.model_or_path.name_or_path or None
            model = quantize_model(self.model_or_path, config)
        else:
            source = os.fspath(self.model_or_path)
            model_cls = model_class_for(self.model_or_path)
            model = model_cls.from_pretrained(self.model_or_path, quantization_config=config, **kwargs)
        model.save_pretrained(save_dir)
        if with_preprocessing and source:
            hub_kwargs = {name: kwargs[name] for name in _HUB_KWARGS if name in kwargs}
            save_preprocessing(source, save_dir, trust_remote_code=kwargs.get("trust_remote_code", False), **hub_kwargs)
        return model


def save_preprocessing(source: str | os.PathLike, save_dir: str | os.PathLike, **kwargs: Any) -> bool:
    """Save the tokenizer or processor of the model at ``source`` into ``save_dir``; whether one was saved.

    ``source`` is a local folder or a Hub id. Nothing is loaded unless it holds one of
    :data:`PROCESSOR_FILES` or :data:`TOKENIZER_FILES`. ``AutoProcessor`` loads what there is (a
    processor, else the tokenizer, image processor or feature extractor); where it fails and the
    source has tokenizer files, ``AutoTokenizer`` is tried. A preprocessing that cannot be loaded is
    logged as a warning, never raised: the model is saved already. ``kwargs`` go to
    ``from_pretrained`` (``revision``, ``token``, ``cache_dir``, ``local_files_only`` also to the
    file look-up).
    """
    source = os.fspath(source)
    lookup = {name: kwargs[name] for name in _HUB_KWARGS if name in kwargs}
    try:
        tokenizer_files = [name for name in TOKENIZER_FILES if has_file(source, name, **lookup)]
        processor_files = [name for name in PROCESSOR_FILES if has_file(source, name, **lookup)]
    except Exception as exc:  # not a repository, no access: huggingface_hub raises many error types
        logger.warning("cannot look for a tokenizer in %s (%s); %s holds the model only", source, exc, save_dir)
        return False
    if not tokenizer_files and not processor_files:
        logger.info("%s has no tokenizer or processor; %s holds the model only", source, save_dir)
        return False
    loaders = [AutoProcessor, AutoTokenizer] if tokenizer_files else [AutoProcessor]
    errors = []
    for loader in loaders:
        try:
            preprocessing = loader.from_pretrained(source, **kwargs)
        except Exception as exc:  # a missing optional library (PIL, sentencepiece), a damaged file
            errors.append(f"{loader.__name__}: {type(exc).__name__}: {exc}")
            continue
        preprocessing.save_pretrained(save_dir)
        logger.info("saved the %s of %s in %s", type(preprocessing).__name__, source, save_dir)
        return True
    logger.warning(
        "the tokenizer or processor of %s could not be loaded (%s); %s holds the model only: save its tokenizer "
        "there yourself for pipeline(model=...) to use it",
        source,
        "; ".join(errors),
        save_dir,
    )
    return False


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
