"""Checking a saved SplitQuant folder before trusting it (or before pushing it)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..checkpoint.format import FORMAT_VERSION, coded_version
from ..checkpoint.headers import check_consistency, check_scale_dtype, read_checkpoint_index
from ..report import size_report
from .config import QUANT_METHOD, SplitQuantConfig
from .optimum import model_class_for

__all__ = ["CheckpointReport", "verify_checkpoint"]

_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class CheckpointReport:
    """What :func:`verify_checkpoint` found."""

    path: str
    files: tuple[str, ...]
    config: SplitQuantConfig
    quantized_layers: int
    effective_bits: float | None


def verify_checkpoint(path: str | os.PathLike, *, load: bool = True) -> CheckpointReport:
    """Raise ``ValueError`` unless ``path`` is a complete, consistent SplitQuant checkpoint.

    Reads ``config.json`` and the safetensors headers only (never a pickle), then, with ``load``,
    loads the model through transformers so that every tensor's shape, dtype and content checks run.
    Also catches what transformers itself would only warn about: SplitQuant tensors under a
    ``config.json`` that lost its ``quantization_config``.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder}: no config.json")
    config = _read_json(config_file, "restore the config.json saved with the model")
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_file}: expected a JSON object of model settings, found a JSON {_json_type(config)}; "
            "restore the config.json saved with the model"
        )
    _check_architectures(config, config_file)
    files = _weight_files(folder)
    index = read_checkpoint_index(folder / f for f in files)
    quantized = index.quantized_modules()
    qc = config.get("quantization_config")
    if qc is None or qc == {}:
        if quantized:
            raise ValueError(
                f"{folder}: the weights are SplitQuant tensors but config.json has no quantization_config "
                "(stripped?); transformers would load random float weights — restore the saved config.json"
            )
        raise ValueError(f"{folder}: not a SplitQuant checkpoint (config.json has no quantization_config)")
    if not isinstance(qc, dict):
        raise ValueError(
            f"{config_file}: quantization_config must be a JSON object (a saved SplitQuantConfig such as "
            f'{{"quant_method": "{QUANT_METHOD}", "bits": 4, ...}}), found a JSON {_json_type(qc)} {_brief(qc)}; '
            "restore the config.json saved with the model"
        )
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        found = "has no quant_method" if method is None else f"has quant_method {_brief(method)}"
        raise ValueError(
            f'{config_file}: quantization_config {found}, not "{QUANT_METHOD}"; this is not a SplitQuant '
            "checkpoint (load it with the library that wrote it) or its config.json is damaged"
        )
    try:
        qconfig = SplitQuantConfig.from_dict(dict(qc))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_file}: invalid quantization_config: {exc}") from None
    check_consistency(index, FORMAT_VERSION, qconfig.storage_settings(), coded_version=coded_version(qconfig.to_spec()))
    check_scale_dtype(index, qconfig.scale_dtype, f"{config_file} quantization_config.scale_dtype")
    layers, bits = len(quantized), None
    if load:
        model_class = model_class_for(folder)
        model = model_class.from_pretrained(folder)
        report = size_report(model)
        layers, bits = report.quantized_layers, report.effective_bits
        if layers < len(quantized):
            _unchecked(folder, model, quantized, layers)
    return CheckpointReport(str(folder), tuple(files), qconfig, layers, bits)


def _unchecked(folder: Path, model: object, quantized: set[str], loaded: int) -> None:
    """Refuse a load that left SplitQuant layers unread (a task head outside the class that was loaded)."""
    rebuilt = set(getattr(getattr(model, "hf_quantizer", None), "loaded_layers", {}))
    left = sorted(quantized - rebuilt) or sorted(quantized)
    raise ValueError(
        f"{folder}: {type(model).__name__} (the class config.json's architectures names, or AutoModel when it "
        f"names none that transformers has) loads only {loaded} of the {len(quantized)} SplitQuant layers; "
        f"{left[:5]} were not checked: set architectures to the class the model was saved from"
    )


def _read_json(file: Path, fix: str) -> object:
    """``file`` parsed as JSON; ``ValueError`` naming it when it is not (including nesting too deep to parse)."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"{file}: JSON nested too deeply to parse (damaged or crafted); {fix}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{file}: not valid JSON ({exc}); {fix}") from None


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _brief(value: object, limit: int = 60) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_architectures(config: dict, config_file: Path) -> None:
    """``architectures``, when present, must be a list of class names (transformers loads the first)."""
    arch = config.get("architectures")
    if arch is None:
        return
    if not isinstance(arch, list) or not all(isinstance(a, str) and a for a in arch):
        raise ValueError(
            f"{config_file}: architectures must be a list of model class names such as "
            f'["BertModel"], found {_brief(arch)}; restore the config.json saved with the model'
        )


def _weight_files(folder: Path) -> list[str]:
    index_file = folder / _INDEX
    if index_file.is_file():
        index = _read_json(index_file, "save the model again, or restore the index saved with it")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(
                f'{index_file}: not a valid safetensors index (needs a non-empty "weight_map" object of '
                "tensor name -> shard file); save the model again, or restore the index saved with it"
            )
        root = folder.resolve()
        for tensor, shard in weight_map.items():
            _check_shard_entry(folder, root, tensor, shard)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ValueError(f"{folder}: shards listed in {_INDEX} are missing: {missing}")
        return files
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ValueError(f"{folder}: only pickle weights found; SplitQuant reads safetensors only")
    raise ValueError(f"{folder}: no model.safetensors or {_INDEX}")


def _check_shard_entry(folder: Path, root: Path, tensor: str, shard: object) -> None:
    """Refuse a ``weight_map`` entry that names no file inside ``folder``.

    Absolute paths, ``..`` components and directories that are symlinks leading out of the folder
    are refused, so a crafted index cannot make verification read files elsewhere. The shard file
    itself may be a symlink (the Hugging Face cache links snapshot files to its blob store).
    """
    where = f"{folder / _INDEX}: weight_map entry {tensor!r} -> {_brief(shard, 300)}"
    fix = "shards must be files inside the checkpoint folder; the index is damaged or crafted — do not load it"
    if not isinstance(shard, str) or not shard.strip():
        raise ValueError(f"{where} is not a file name; {fix}")
    rel = PurePosixPath(shard.replace("\\", "/"))
    if rel.is_absolute() or PureWindowsPath(shard).is_absolute() or PureWindowsPath(shard).drive or ".." in rel.parts:
        raise ValueError(f"{where} points outside the checkpoint folder; {fix}")
    parent = (folder / rel).parent.resolve()
    if parent != root and root not in parent.parents:
        raise ValueError(f"{where} leads outside the checkpoint folder through a symlink (to {parent}); {fix}")
