"""The model a command works on: where it is, its config, its task and Auto class, tokenizer, size on disk."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import constants
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from .console import CliError, one_line

__all__ = [
    "AUTO_CLASSES",
    "TASKS",
    "auto_class",
    "load_config",
    "load_tokenizer",
    "model_source",
    "resolve_task",
    "safetensors_bytes",
]

logger = logging.getLogger(__name__)

TASKS = ("auto", "feature-extraction", "text-classification", "text-generation")
# The transformers Auto class that loads a model for each pipeline task (also named in the model card).
AUTO_CLASSES = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "text-generation": "AutoModelForCausalLM",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def model_source(model: str) -> str:
    """``model`` as ``from_pretrained`` takes it: the expanded local path if it exists, else the Hub id."""
    local = Path(model).expanduser()
    return str(local) if local.exists() else model


def load_config(model: str) -> PretrainedConfig:
    """The model's transformers config; a missing folder or an unreachable Hub id is a ``CliError``."""
    local = Path(model).expanduser()
    if not local.exists() and (model.startswith((".", "/", "~")) or not _HUB_ID.match(model)):
        raise CliError(f"model path {model!r} does not exist")
    if local.exists() and not (local / "config.json").is_file():
        raise CliError(f"{model!r} is not a transformers model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(model_source(model))
    except (OSError, ValueError) as exc:
        if local.exists():
            raise CliError(f"cannot read the config of {model!r}: {one_line(exc)}") from exc
        if constants.HF_HUB_OFFLINE:
            raise CliError(
                f"{model!r} is not a local folder, and offline mode (HF_HUB_OFFLINE=1) forbids a download"
            ) from exc
        raise CliError(
            f"{model!r} is neither a local folder nor a model on the Hugging Face Hub: {one_line(exc)}"
        ) from exc


def resolve_task(config: PretrainedConfig, task: str = "auto") -> str:
    """The pipeline task of a model: ``task`` itself, or inferred from ``config.architectures``."""
    if task != "auto":
        return task
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    if arch == "" or arch.endswith("Model"):
        return "feature-extraction"
    raise CliError(f"cannot infer the task of architecture {arch!r}; pass --task {{{','.join(TASKS[1:])}}}")


def auto_class(task: str) -> type:
    """The transformers Auto class for ``task`` (one of ``TASKS`` other than ``auto``)."""
    return getattr(transformers, AUTO_CLASSES[task])


def load_tokenizer(source: str) -> Any | None:
    """The tokenizer saved at ``source``, or ``None`` (with a warning) if there is none."""
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("no tokenizer could be loaded from %s (%s)", source, one_line(exc))
        return None


def safetensors_bytes(folder: Path) -> int | None:
    """Total size of the ``*.safetensors`` files in ``folder``; ``None`` if it has none (or is no folder)."""
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    return sum(f.stat().st_size for f in files) if files else None
