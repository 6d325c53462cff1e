"""The hooks that teach PEFT's own entry points the SplitQuant layers (:func:`register_with_peft`).

Each hook wraps a PEFT function and changes nothing for other layers: LoRA's dispatcher tries
:func:`~.layers.dispatch_splitquant` first, ``_set_trainable`` wraps modules holding SplitQuant layers
in :class:`~.layers.SplitQuantModulesToSave` before PEFT does, and the parameter count adds the
weights SplitQuant layers hold in buffers.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from ...layers import set_submodule
from .layers import SplitQuantModulesToSave, dispatch_splitquant, holds_splitquant, weights_in_buffers

__all__ = ["KEEP_PACKED", "register_with_peft"]

logger = logging.getLogger(__name__)

# Layers whose modules_to_save copy stays packed while an adapter file that stores it so is loaded.
KEEP_PACKED: ContextVar[frozenset[str]] = ContextVar("splitquant_keep_packed", default=frozenset())


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first float parameter (embeddings, norms), ``None`` without one."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


@contextmanager
def _modules_to_save_in_float(
    model: nn.Module, patterns: Collection[str], adapter_name: str, keep_packed: Collection[str] = ()
) -> Iterator[dict[str, SplitQuantModulesToSave]]:
    """Wrap the modules of ``model`` named by ``patterns`` that hold SplitQuant layers before PEFT does.

    PEFT wraps the module under every name that ends with an entry of ``modules_to_save`` and, finding
    a wrapper there, adds the adapter to it. Modules holding a layer named in ``keep_packed`` are left
    to PEFT. Yields the new wrappers by name; if the body raises, the modules are put back.
    """
    dtype = _float_dtype(model)
    wrapped: dict[str, SplitQuantModulesToSave] = {}
    originals: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not name or not any(name.endswith(p) for p in patterns):
            continue
        if any(name.startswith(f"{outer}.") for outer in wrapped):
            continue  # inside a module wrapped already
        if isinstance(module, (AuxiliaryTrainingWrapper, BaseTunerLayer)) or not holds_splitquant(module):
            continue
        plain = name.removeprefix("base_model.model.")  # the names PEFT saves under
        if any(layer == plain or layer.startswith(f"{plain}.") for layer in keep_packed):
            continue
        wrapped[name] = SplitQuantModulesToSave(module, adapter_name, dtype)
        originals[name] = module
        set_submodule(model, name, wrapped[name])
    if wrapped:
        logger.info("SplitQuant: modules_to_save trains float copies of %s", sorted(wrapped))
    try:
        yield wrapped
    except BaseException:
        for name, module in originals.items():
            set_submodule(model, name, module)
        raise


_ORIGINAL = "_splitquant_original"  # attribute of a hook: the PEFT function it wraps


def _hook(owner: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Set ``owner.name`` to ``wrap(original)`` (again over the original if hooked before); False if absent."""
    current = getattr(owner, name, None)
    if current is None:
        return False
    original = getattr(current, _ORIGINAL, current)
    hooked = wrap(original)
    setattr(hooked, _ORIGINAL, original)
    setattr(owner, name, hooked)
    return True


def _dispatch_splitquant_first(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def dispatch_default(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> Any:
        module = dispatch_splitquant(target, adapter_name, config, **kwargs)
        return module if module is not None else original(target, adapter_name, config=config, **kwargs)

    return dispatch_default


def _with_float_copies(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _set_trainable(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs).arguments
        patterns = call.get("module_names")
        model = call.get("model")
        if (
            not patterns
            or not isinstance(model, nn.Module)
            or call.get("wrapper_cls") not in (None, ModulesToSaveWrapper)
            or kwargs.get("tied_module") is not None
        ):
            return original(*args, **kwargs)
        adapter_name = call["adapter_name"]
        with _modules_to_save_in_float(model, patterns, adapter_name, KEEP_PACKED.get()) as wrapped:
            result = original(*args, **kwargs)
        if not call.get("activate_adapter", True):  # as PEFT leaves a wrapper it creates for an inactive adapter
            for wrapper in wrapped.values():
                wrapper.modules_to_save[adapter_name].requires_grad_(False)
        return result

    return _set_trainable


def _counting_weights_in_buffers(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_nb_trainable_parameters(self: nn.Module) -> tuple[int, int]:
        trainable, total = original(self)
        return trainable, total + weights_in_buffers(self)

    return get_nb_trainable_parameters


def register_with_peft() -> None:
    """Teach PEFT's own entry points the SplitQuant layers (idempotent; importing this module calls it).

    Hooks LoRA's dispatcher list, ``modules_to_save`` and the parameter count (see the module
    docstring). A hook whose PEFT function this PEFT version lacks is skipped with a warning.
    """
    sites: list[tuple[str, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
        ("peft.tuners.lora.model", "dispatch_default", _dispatch_splitquant_first),
        # _set_trainable is called through these modules' own names for it.
        ("peft.utils.other", "_set_trainable", _with_float_copies),
        ("peft.utils", "_set_trainable", _with_float_copies),
        ("peft.peft_model", "_set_trainable", _with_float_copies),
        ("peft.mixed_model", "_set_trainable", _with_float_copies),
        ("peft.peft_model", "PeftModel.get_nb_trainable_parameters", _counting_weights_in_buffers),
        ("peft.mixed_model", "PeftMixedModel.get_nb_trainable_parameters", _counting_weights_in_buffers),
    ]
    missing = []
    for module_name, path, wrap in sites:
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            owner = None
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part, None)
        if owner is None or not _hook(owner, name, wrap):
            missing.append(f"{module_name}.{path}")
    if missing:
        logger.warning(
            "SplitQuant: this PEFT version has no %s; plain PEFT may not adapt SplitQuant layers there "
            "(pin peft to a tested version, see the [train] extra)",
            missing,
        )
