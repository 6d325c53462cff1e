"""Checkpoint key names as transformers' loader sees them.

transformers 5 renames checkpoint keys while loading (legacy layouts, added or dropped base-model
prefixes, a ``key_mapping``); the SplitQuant layers a checkpoint stores are found under those names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from ..checkpoint.format import LAYER_TENSORS, PACKED
from ..layers import eligible_layers

__all__ = ["checkpoint_key_renamer", "module_renamer", "outside_base_model"]


def checkpoint_key_renamer(model: torch.nn.Module, conversions: list | None = None) -> Callable[[str], str]:
    """A function giving each checkpoint key the name transformers' loader gives it for ``model``.

    Uses transformers' own rules: the model's registered key conversions (``conversions``, by default
    those ``from_pretrained`` builds without a ``key_mapping``: legacy layouts, renamed modules), then
    adding or dropping ``model.base_model_prefix`` to match the model's keys, where the model's
    eligible layers count as holding SplitQuant tensors. The conversions are copied, so calling the
    function leaves the loader's own ones untouched.
    """
    if conversions is None:
        conversions = get_model_conversion_mapping(model)
    conversions = copy.deepcopy(conversions)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    prefix = model.base_model_prefix
    expected = dict.fromkeys(model.state_dict(), True)
    for name in eligible_layers(model):
        expected.update(dict.fromkeys((f"{name}.{t}" for t in LAYER_TENSORS), True))

    def rename(key: str) -> str:
        # As transformers' convert_and_load_state_dict_in_model renames each checkpoint key.
        new, _ = rename_source_key(key, renamings, converters, prefix, expected)
        if new not in expected and key in expected:
            new, _ = rename_source_key(key, [], [], prefix, expected)
        return new

    return rename


def module_renamer(rename: Callable[[str], str]) -> Callable[[str], str]:
    """Module name in the checkpoint -> module name in the model, from a key renamer."""
    tail = f".{PACKED}"
    return lambda module: rename(module + tail).removesuffix(tail)


def outside_base_model(model: torch.nn.Module, stored: list[str], unknown: list[str]) -> list[str]:
    """The ``unknown`` layers a base model skips, as transformers skips a task head's float tensors.

    When a base model (``BertModel``) loads the save of a model with a head
    (``BertForSequenceClassification``), transformers drops the ``bert.`` prefix and leaves the head's
    keys unexpected. Only that case is tolerated: the model is its own base model, the checkpoint
    stores layers under the prefix, and the layer is not under it.
    """
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or getattr(model, "base_model", None) is not model:
        return []
    under = f"{prefix}."
    if not any(name.startswith(under) for name in stored):
        return []
    return [name for name in unknown if not name.startswith(under)]
