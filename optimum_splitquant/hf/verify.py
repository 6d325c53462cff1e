"""Checking a saved SplitQuant folder before trusting it (or before pushing it)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.format import FORMAT_VERSION
from ..checkpoint.headers import check_consistency, read_checkpoint_index
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
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{config_file}: not valid JSON ({exc})") from None
    files = _weight_files(folder)
    index = read_checkpoint_index(folder / f for f in files)
    quantized = index.quantized_modules()
    qc = config.get("quantization_config")
    if not qc:
        if quantized:
            raise ValueError(
                f"{folder}: the weights are SplitQuant tensors but config.json has no quantization_config "
                "(stripped?); transformers would load random float weights — restore the saved config.json"
            )
        raise ValueError(f"{folder}: not a SplitQuant checkpoint (config.json has no quantization_config)")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ValueError(f"{folder}: quantization_config is for {method!r}, not {QUANT_METHOD!r}")
    qconfig = SplitQuantConfig.from_dict(dict(qc))
    check_consistency(index, FORMAT_VERSION, qconfig.storage_settings())
    layers, bits = len(quantized), None
    if load:
        model = model_class_for(folder).from_pretrained(folder)
        report = size_report(model)
        layers, bits = report.quantized_layers, report.effective_bits
    return CheckpointReport(str(folder), tuple(files), qconfig, layers, bits)


def _weight_files(folder: Path) -> list[str]:
    index_file = folder / _INDEX
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index_file}: not a valid safetensors index ({exc})") from None
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
