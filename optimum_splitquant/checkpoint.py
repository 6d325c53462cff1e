"""Reading safetensors headers: which tensors a checkpoint holds, with shapes and dtypes.

Only headers are read (no tensor data, never a pickle). The loader uses this to build every
quantized module from the checkpoint's own shapes and to refuse a damaged checkpoint before any
weight is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from safetensors import safe_open

__all__ = ["METADATA_FORMAT_KEY", "CheckpointIndex", "TensorInfo", "read_checkpoint_index"]

METADATA_FORMAT_KEY = "splitquant_format_version"


@dataclass(frozen=True)
class TensorInfo:
    """Shape and safetensors dtype string (``"U8"``, ``"F16"``, ...) of one stored tensor, and its file."""

    shape: tuple[int, ...]
    dtype: str
    file: str


@dataclass
class CheckpointIndex:
    """All tensors of a (possibly sharded) checkpoint, and each file's header metadata."""

    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)

    def module_names_with(self, suffix: str) -> set[str]:
        """Names of modules that own a tensor called ``suffix`` (e.g. ``"weight_packed"``)."""
        tail = "." + suffix
        return {name[: -len(tail)] for name in self.tensors if name.endswith(tail)}

    def format_versions(self) -> set[str]:
        """The SplitQuant format versions recorded in the file headers (empty if none)."""
        return {meta[METADATA_FORMAT_KEY] for meta in self.metadata.values() if METADATA_FORMAT_KEY in meta}


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
