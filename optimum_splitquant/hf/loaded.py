"""The SplitQuant layers of a model once transformers has loaded it: gathered, checked, validated.

Also what saving needs to know of them: the one dtype their scales are held in. Offloaded layers
(accelerate's ``device_map`` with ``"disk"``, or ``"cpu"`` beside an accelerator) keep their stored
tensors off the model; they are validated one at a time, brought in by :func:`onloaded`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from ..checkpoint.format import stored_tensors
from ..core.spec import SCALE_DTYPES
from ..nn.compact import SplitQuantModule
from ..nn.validation import validate_layers

__all__ = ["gather_layers", "held_scale_dtype", "offloaded_weights", "onloaded", "validate_loaded"]


def offloaded_weights(module: torch.nn.Module) -> Mapping[str, torch.Tensor] | None:
    """The tensors an offload hook holds for ``module`` off the model, by name, or None.

    accelerate's ``AlignDevicesHook`` (``device_map`` with ``"disk"``, or ``"cpu"`` beside an accelerator)
    leaves the module's tensors on the meta device and reads them from its ``weights_map`` (the offload
    folder, the checkpoint files, or a CPU state dict) for each forward. Duck-typed: accelerate stays optional.
    """
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", (hook,)):  # a SequentialHook chains several
        weights = getattr(candidate, "weights_map", None)
        if getattr(candidate, "offload", False) and weights is not None:
            return weights
    return None


@contextlib.contextmanager
def onloaded(name: str, module: SplitQuantModule) -> Iterator[None]:
    """Within the block, ``module`` holds its offloaded stored tensors; afterwards it is as it was.

    Only the stored tensors are read (not the bias), and they are dropped again afterwards, so the layer
    keeps no memory the offload meant to spare.
    """
    weights = offloaded_weights(module)
    buffers = dict(module._buffers)
    try:
        for buf in stored_tensors(module.spec, module.out_features):
            if module._buffers[buf].is_meta:
                try:
                    module._buffers[buf] = weights[buf]
                except KeyError:
                    raise ValueError(
                        f"{name}.{buf} was not loaded (on the meta device, and not among the offloaded weights)"
                    ) from None
        yield
    finally:
        module._buffers.clear()
        module._buffers.update(buffers)


def gather_layers(model: torch.nn.Module) -> tuple[dict[str, SplitQuantModule], dict[str, SplitQuantModule]]:
    """``(layers in memory, offloaded layers)`` of a loaded ``model``, by name.

    Raises ``ValueError`` naming a layer that was never quantized (its weight was not in the
    checkpoint) or whose stored tensors are still on the meta device with no offload hook holding
    them. The in-memory layers choose how they compute (:meth:`SplitQuantModule.select_compute_`):
    transformers replaced their stored tensors without moving the module.
    """
    loaded: dict[str, SplitQuantModule] = {}
    offloaded: dict[str, SplitQuantModule] = {}  # stored tensors held by an offload hook (disk or CPU)
    for name, module in model.named_modules():
        if not isinstance(module, SplitQuantModule):
            continue
        if not module.is_quantized:
            raise ValueError(
                f"{name}.weight was not found in the checkpoint, so layer {name!r} could not be quantized; "
                f"add it to SplitQuantConfig(modules_to_not_convert=[...]) to keep it in float"
            )
        on_meta = [buf for buf in stored_tensors(module.spec, module.out_features) if getattr(module, buf).is_meta]
        if on_meta and offloaded_weights(module) is not None:
            offloaded[name] = module
            continue
        if on_meta:
            raise ValueError(f"{name}.{on_meta[0]} was not loaded (still on the meta device)")
        module.select_compute_()
        loaded[name] = module
    return loaded, offloaded


def validate_loaded(
    loaded: Mapping[str, SplitQuantModule], offloaded: Mapping[str, SplitQuantModule], dtype: torch.dtype | None
) -> None:
    """:func:`~optimum_splitquant.nn.validation.validate_layers` on every layer; offloaded ones one at a time."""
    validate_layers(dict(loaded), dtype)
    for name, module in offloaded.items():  # one layer in memory at a time
        with onloaded(name, module):
            validate_layers({name: module}, dtype)


def held_scale_dtype(model: torch.nn.Module) -> str | None:
    """The name (a key of ``SCALE_DTYPES``) of the one dtype ``model``'s SplitQuant scales are held in.

    ``None`` without a quantized SplitQuant layer. Raises ``ValueError`` naming the dtypes found
    when they are several, or one that a checkpoint cannot store (``model.to(dtype)`` casts them).
    """
    found: dict[torch.dtype, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, SplitQuantModule) and module.is_quantized:
            for buf in stored_tensors(module.spec, module.out_features):  # ranges or range steps, column scales
                if getattr(module, buf).is_floating_point():
                    found.setdefault(getattr(module, buf).dtype, name)
    if not found:
        return None
    names = {dtype: key for key, dtype in SCALE_DTYPES.items()}
    if len(found) > 1 or next(iter(found)) not in names:
        shown = ", ".join(f"{dtype} (e.g. {layer})" for dtype, layer in found.items())
        raise ValueError(
            f"cannot save: SplitQuant scales and offsets are held in {shown}; a checkpoint stores them in one "
            f"of {sorted(SCALE_DTYPES)}: cast the model with model.to(dtype) first"
        )
    return names[next(iter(found))]
