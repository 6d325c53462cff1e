"""The stored format: tensor names, shapes and dtypes, header metadata, reading headers, atomic saves."""

from .format import FORMAT_VERSION, layer_tensors
from .headers import CheckpointIndex, TensorInfo, check_consistency, header_metadata, read_checkpoint_index
from .saving import save_pretrained_atomic

__all__ = [
    "FORMAT_VERSION",
    "CheckpointIndex",
    "TensorInfo",
    "check_consistency",
    "header_metadata",
    "layer_tensors",
    "read_checkpoint_index",
    "save_pretrained_atomic",
]
