"""Reading safetensors headers: which tensors a checkpoint holds, with shapes and dtypes.

Only headers are read (no tensor data, never a pickle). The loader uses this to build every
quantized module from the checkpoint's own shapes and to refuse a damaged checkpoint before any
weight is loaded.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from safetensors import safe_open

from .format import (
    LAYER_TENSORS,
    METADATA_FORMAT_KEY,
    METADATA_SAVE_ID_KEY,
    METADATA_SETTINGS_KEY,
    OFFSET,
    PACKED,
    RANGE_STEPS,
    SCALE,
    SCALE_FILE_DTYPES,
    TensorLayout,
)

__all__ = [
    "CheckpointIndex",
    "TensorInfo",
    "check_consistency",
    "check_scale_dtype",
    "header_metadata",
    "parse_format_version",
    "read_checkpoint_index",
]

_VERSION_SYNTAX = re.compile(r"[1-9][0-9]{0,8}")
"""A format version as :func:`header_metadata` writes it: ASCII digits, no sign, no leading zero, at most 9 digits."""

MAX_SETTINGS_CHARS = 65536
"""Longest ``splitquant_settings`` value read; a real one is under 200 characters."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and safetensors dtype string (``"U8"``, ``"F16"``, ...) of one stored tensor, and its file.

    ``stored_as`` is the tensor's name in the file when the index names it otherwise
    (:meth:`CheckpointIndex.renamed`), else ``None``.
    """

    shape: tuple[int, ...]
    dtype: str
    file: str
    stored_as: str | None = None

    def where(self, key: str) -> str:
        """``key`` as an error message names it: with its name in the file if that differs, and the file."""
        stored = f" (stored as {self.stored_as!r})" if self.stored_as is not None else ""
        return f"tensor {key!r}{stored} in {self.file}"


@dataclass
class CheckpointIndex:
    """All tensors of a (possibly sharded) checkpoint, and each file's header metadata."""

    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)

    def quantized_modules(self) -> set[str]:
        """Names of the modules stored in SplitQuant form (those owning a ``weight_packed`` tensor)."""
        tail = f".{PACKED}"
        return {name[: -len(tail)] for name in self.tensors if name.endswith(tail)}

    def renamed(self, rename: Callable[[str], str]) -> CheckpointIndex:
        """The same tensors under the names ``rename`` gives them (each keeps its name in the file).

        Raises ``ValueError`` when two stored tensors would get the same name and one of them is a
        SplitQuant tensor (of two float tensors the first is kept, as transformers keeps one).
        """
        index = CheckpointIndex(metadata=self.metadata)
        for key, info in self.tensors.items():
            new = rename(key)
            other = index.tensors.get(new)
            if other is not None:
                if new.endswith(tuple(f".{t}" for t in LAYER_TENSORS)):
                    raise ValueError(
                        f"{other.where(new)} and tensor {key!r} in {info.file} both load as {new!r}; the checkpoint "
                        "holds the same tensor twice under different names"
                    )
                continue
            index.tensors[new] = info if new == key else replace(info, stored_as=key)
        return index

    def check_layer(self, name: str, expected: dict[str, TensorLayout], layer: str, settings: str) -> None:
        """Raise ``ValueError`` unless module ``name`` stores exactly the ``expected`` tensors.

        ``layer`` describes the model's layer and ``settings`` the quantization settings, for the message.
        """
        for tensor, want in expected.items():
            key = f"{name}.{tensor}"
            info = self.tensors.get(key)
            if info is None:
                packed = self.tensors.get(f"{name}.{PACKED}")
                stored = packed.stored_as if packed is not None else None
                hint = f" (module stored as {stored.removesuffix(f'.{PACKED}')!r})" if stored else ""
                raise ValueError(f"SplitQuant checkpoint is missing tensor {key!r}{hint}; the checkpoint is incomplete")
            if info.shape != want.shape or info.dtype not in want.file_dtypes:
                raise ValueError(
                    f"{info.where(key)} has shape {list(info.shape)} and dtype {info.dtype}; "
                    f"expected shape {list(want.shape)} and dtype in {list(want.file_dtypes)} for {layer} "
                    f"with {settings}"
                )
        if f"{name}.weight" in self.tensors:
            raise ValueError(f"checkpoint holds both a float {name}.weight and SplitQuant tensors for {name!r}")

    def format_versions(self) -> set[str]:
        """The SplitQuant format versions recorded in the file headers (empty if none)."""
        return {meta[METADATA_FORMAT_KEY] for meta in self.metadata.values() if METADATA_FORMAT_KEY in meta}


def check_scale_dtype(index: CheckpointIndex, scale_dtype: str, source: str) -> None:
    """Raise ``ValueError`` unless every SplitQuant scale and offset (or range step) is stored as ``scale_dtype``.

    ``scale_dtype`` is a ``SCALE_DTYPES`` name (``"float16"``); ``source`` names where it was declared,
    for the message. Loading would otherwise cast the stored values silently (and lossily).
    """
    names = {str(dtype).removeprefix("torch."): file_dtype for file_dtype, dtype in SCALE_FILE_DTYPES.items()}
    want = names.get(scale_dtype)
    if want is None:
        raise ValueError(f"{source} is {scale_dtype!r}, not one of {sorted(names)}")
    for module in sorted(index.quantized_modules()):
        for key in (f"{module}.{SCALE}", f"{module}.{OFFSET}", f"{module}.{RANGE_STEPS}"):
            info = index.tensors.get(key)
            if info is None or info.dtype == want or info.dtype not in SCALE_FILE_DTYPES:
                continue  # missing or not a float at all: reported with the layer's expected tensors
            stored = str(SCALE_FILE_DTYPES[info.dtype]).removeprefix("torch.")
            raise ValueError(
                f"{info.where(key)} is stored as {info.dtype} ({stored}) but {source} is {scale_dtype!r}; "
                "config.json and the weights disagree (loading would cast every scale): restore the "
                f"config.json saved with the weights, or set scale_dtype to {stored!r} if the tensors are right"
            )


def header_metadata(format_version: int, settings: dict[str, Any]) -> dict[str, str]:
    """Metadata written into every safetensors header of one save.

    ``splitquant_save_id`` is fresh for each save, so shards of different saves (an interrupted
    save over an older checkpoint) are told apart; ``splitquant_settings`` repeats the settings the
    tensors were built with, so a ``config.json`` from another save is caught.
    """
    return {
        METADATA_FORMAT_KEY: str(format_version),
        METADATA_SAVE_ID_KEY: uuid.uuid4().hex,
        METADATA_SETTINGS_KEY: json.dumps(settings, sort_keys=True),
    }


def check_consistency(
    index: CheckpointIndex, supported_version: int, settings: dict[str, Any], *, coded_version: int | None = None
) -> None:
    """Raise ``ValueError`` unless every file holding SplitQuant tensors belongs to one save with ``settings``.

    ``coded_version``, given when the config's layers code their ranges, is the format version their
    headers must state: versions 2 and 3 read the same offset codes differently.
    """
    files_with_q = {info.file for key, info in index.tensors.items() if key.endswith(f".{PACKED}")}
    if not files_with_q:
        raise ValueError(
            "config.json declares quant_method 'splitquant' but the checkpoint holds no SplitQuant tensors "
            "(float weights under a SplitQuant config); load the float model without that quantization_config, "
            "or pass the float folder with quantization_config=SplitQuantConfig(...) to quantize it"
        )
    save_ids = set()
    for name in sorted(files_with_q):
        meta = index.metadata.get(name, {})
        version = meta.get(METADATA_FORMAT_KEY)
        if version is None:
            raise ValueError(
                f"{name}: header has no {METADATA_FORMAT_KEY}; not written by optimum-splitquant, or damaged"
            )
        parsed = parse_format_version(version, name, supported_version)
        if coded_version is not None and parsed != coded_version:
            raise ValueError(
                f"{name}: its coded ranges were written in format {parsed} but config.json says format_version "
                f"{coded_version}; config.json and the weights come from different saves: restore the config.json "
                "saved with the weights"
            )
        stored = meta.get(METADATA_SETTINGS_KEY)
        if stored is not None:
            stored_settings = _parse_settings(stored, name)
            if stored_settings != settings:
                raise ValueError(
                    f"{name}: its tensors were written with {_brief(stored_settings)} but config.json says "
                    f"{settings}; config.json and the weights come from different saves"
                )
        save_ids.add(meta.get(METADATA_SAVE_ID_KEY))
    if len(save_ids) > 1:
        raise ValueError(
            "the checkpoint's shards come from different saves (an interrupted save over an older checkpoint?); "
            "save the model again"
        )


def parse_format_version(value: str, file: str, supported_version: int) -> int:
    """The SplitQuant format version in header field ``splitquant_format_version`` of ``file``.

    Only what :func:`header_metadata` writes is accepted: ASCII decimal digits without sign or
    leading zero (so ``"01"`` and ``"+1"`` are refused, as are full-width or other Unicode digits),
    with a value in ``1..supported_version``. Anything else raises ``ValueError`` naming ``file``
    and the field: a larger well-formed number (up to 9 digits) says to upgrade, the rest (``"0"``,
    ``"-1"``, ``"01"``, a full-width ``"\\uff11"``, thousands of digits) says the header is damaged.
    """
    field_name = f"{file}: header field {METADATA_FORMAT_KEY}"
    if isinstance(value, str) and _VERSION_SYNTAX.fullmatch(value):
        version = int(value)
        if version <= supported_version:
            return version
        raise ValueError(
            f"{file}: checkpoint format version {value!r} (header field {METADATA_FORMAT_KEY}) was written by a "
            f"newer optimum-splitquant; this release reads versions 1..{supported_version}: upgrade with "
            "`pip install -U optimum-splitquant`"
        )
    raise ValueError(
        f"{field_name} is {_brief(value)}, not a format version (a plain decimal integer in "
        f"1..{supported_version}, no sign or leading zeros); the file is damaged or was not written by "
        "optimum-splitquant: save the model again"
    )


def _parse_settings(value: str, file: str) -> dict[str, Any]:
    """Header field ``splitquant_settings`` of ``file`` as a dict; ``ValueError`` naming both if it is not one.

    The length is bounded and a nesting too deep for the parser (``RecursionError``) is reported as
    damage, so a crafted header cannot crash or stall the loader.
    """
    field_name = f"{file}: header field {METADATA_SETTINGS_KEY}"
    damaged = "the file is damaged or was not written by optimum-splitquant: save the model again"
    if not isinstance(value, str):
        raise ValueError(f"{field_name} is a {type(value).__name__}, not a JSON string; {damaged}")
    if len(value) > MAX_SETTINGS_CHARS:
        raise ValueError(
            f"{field_name} is implausibly long ({len(value)} characters, at most {MAX_SETTINGS_CHARS}); {damaged}"
        )
    try:
        settings = json.loads(value)
    except RecursionError:
        raise ValueError(f"{field_name} is JSON nested too deeply to be settings; {damaged}") from None
    except ValueError as exc:
        raise ValueError(f"{field_name} is not valid JSON ({exc}); {damaged}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{field_name} is a JSON {type(settings).__name__}, not an object of settings; {damaged}")
    return settings


def _brief(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters (with the full length), for error messages."""
    try:
        text = repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deeply to show>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def read_checkpoint_index(files: Iterable[str | os.PathLike]) -> CheckpointIndex:
    """Read the headers of safetensors ``files``; raise ``ValueError`` for anything else or a damaged file."""
    index = CheckpointIndex()
    for path in files:
        path = os.fspath(path)
        name = os.path.basename(path)
        if not path.endswith(".safetensors"):
            raise ValueError(
                f"{name}: SplitQuant reads only safetensors checkpoints (no pickle); convert the model with "
                "`model.save_pretrained(dir)` (safetensors by default) and load that folder"
            )
        try:
            with safe_open(path, framework="pt") as f:
                index.metadata[name] = dict(f.metadata() or {})
                names = f.keys()  # a safe_open handle is not iterable
                for key in names:
                    sl = f.get_slice(key)
                    index.tensors[key] = TensorInfo(tuple(sl.get_shape()), str(sl.get_dtype()), name)
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise ValueError(f"{name}: not a readable safetensors file ({exc})") from exc
    return index
