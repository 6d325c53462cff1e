"""The model a command works on: where it is, its config, its task and Auto class, tokenizer, size on disk.

Every model a command loads goes through :func:`load_model`, which reads safetensors only, never
a pickle: a float model as much as a SplitQuant one (whose loader refuses pickles by itself).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import constants
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from ..checkpoint.headers import read_checkpoint_index
from ..hf.optimum import TOKENIZER_FILES
from .console import CliError, one_line

__all__ = [
    "AUTO_CLASSES",
    "TASKS",
    "auto_class",
    "check_safetensors_only",
    "load_config",
    "load_model",
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
_SAFE_WEIGHTS, _SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth")  # what a folder without safetensors may hold instead


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


def load_model(auto: type, source: str, config: PretrainedConfig, **kwargs: Any) -> nn.Module:
    """``auto.from_pretrained(source, **kwargs)`` from safetensors only (``config`` is the model's own).

    :func:`check_safetensors_only` refuses a pickle first; ``use_safetensors=True`` then keeps
    transformers from ever falling back to one.
    """
    check_safetensors_only(source, config)
    return auto.from_pretrained(source, use_safetensors=True, **kwargs)


def check_safetensors_only(source: str, config: PretrainedConfig) -> None:
    """Refuse, before anything loads, a model whose weights would be read from a pickle.

    The weight files a load reads (the file that ``config.json`` names as ``transformers_weights``,
    else ``model.safetensors``, else the shards its ``model.safetensors.index.json`` lists; in a
    local folder without either, the pickles it holds) go through
    :func:`~optimum_splitquant.checkpoint.headers.read_checkpoint_index`, the check of every
    SplitQuant load: a file that is not safetensors is refused unread, with the same message,
    and a damaged safetensors header is a clear error. For a Hub id, the file names are checked
    (the config's, and the shards of the index if the repository has one). Raises ``CliError``.
    """
    local = Path(source)
    try:
        if local.is_dir():
            read_checkpoint_index(_local_weight_files(local, config))
        else:
            names = _hub_weight_names(source, config)
            read_checkpoint_index([name for name in names if not name.endswith(".safetensors")])
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _local_weight_files(folder: Path, config: PretrainedConfig) -> list[Path]:
    """The weight files of ``folder`` that ``from_pretrained(folder)`` would read."""
    explicit = getattr(config, "transformers_weights", None)
    if explicit:
        chosen = folder / str(explicit)
        if not chosen.name.endswith(".safetensors.index.json"):
            return [chosen]
        return [folder / name for name in _shard_names(chosen)]
    if (folder / _SAFE_WEIGHTS).is_file():
        return [folder / _SAFE_WEIGHTS]
    if (folder / _SAFE_INDEX).is_file():
        return [folder / name for name in _shard_names(folder / _SAFE_INDEX)]
    return sorted(p for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern))


def _hub_weight_names(repo_id: str, config: PretrainedConfig) -> list[str]:
    """The weight file names of the Hub model ``repo_id`` that can be known before its weights download.

    The file its config names, or the shards of its safetensors index, if it has one (a repository
    with both ``model.safetensors`` and an index loads the former, but the index is checked too).
    """
    from huggingface_hub import hf_hub_download

    explicit = getattr(config, "transformers_weights", None)
    if explicit and not str(explicit).endswith(".safetensors.index.json"):
        return [str(explicit)]
    index_name = str(explicit or _SAFE_INDEX)
    try:
        index = Path(hf_hub_download(repo_id, index_name))
    except Exception as exc:  # no index (not sharded), offline and not cached, no access: nothing more to check
        logger.debug("no %s for %s (%s)", index_name, repo_id, one_line(exc))
        return []
    return _shard_names(index)


def _shard_names(index: Path) -> list[str]:
    """The files that a safetensors index lists in its ``weight_map``."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted({str(name) for name in weight_map.values()})
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{index.name}: not a readable checkpoint index ({one_line(exc)})") from None


def load_tokenizer(source: str) -> Any | None:
    """The tokenizer saved at ``source``, or ``None`` (with a warning) if there is none.

    A local folder without any tokenizer file has none (``AutoTokenizer`` would build an empty one).
    """
    if Path(source).is_dir() and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("no tokenizer could be loaded from %s (it holds no tokenizer file)", source)
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("no tokenizer could be loaded from %s (%s)", source, one_line(exc))
        return None


def safetensors_bytes(folder: Path) -> int | None:
    """Total size of the ``*.safetensors`` files in ``folder``; ``None`` if it has none (or is no folder)."""
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    return sum(f.stat().st_size for f in files) if files else None
