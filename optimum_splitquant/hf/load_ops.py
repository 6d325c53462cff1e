"""The conversion ops the SplitQuant quantizer hands to transformers' weight loader.

:class:`QuantizeOnLoad` quantizes a float weight as it streams in (quantizing at load);
:class:`LayerTensors` and :class:`LayerConverter` carry a stored layer's SplitQuant tensors through
unchanged (loading a SplitQuant checkpoint, and saving one).
"""

from __future__ import annotations

import copy
import functools
import re
from collections import defaultdict
from typing import Any, Protocol

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter

from ..checkpoint.format import stored_tensors
from .memory import HeapReturner, release_file_pages

__all__ = ["LayerConverter", "LayerTensors", "QuantizeOnLoad"]


class CollectsLoadErrors(Protocol):
    """What :class:`QuantizeOnLoad` reports to: a ``load_errors`` dict (layer name -> message), and the
    :class:`~.memory.HeapReturner` of the load."""

    load_errors: dict[str, str]
    heap: HeapReturner


class QuantizeOnLoad(ConversionOps):
    """Load-time op: quantizes one float weight into its SplitQuant layer and drops the float copy.

    The float weight's pages of the checkpoint's file map go back to the OS at once, and the heap freed
    by quantizing once the resident memory has grown by a bound (:class:`~.memory.HeapReturner`), so
    that a load holds about one layer's float weight and temporaries at a time. A layer that refuses
    its weight has its message recorded in ``hf_quantizer.load_errors``.
    """

    def __init__(self, hf_quantizer: CollectsLoadErrors) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict[str, list[torch.Tensor]],
        model: torch.nn.Module | None = None,
        full_layer_name: str | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        (value,) = next(iter(input_dict.values()))
        module_name = full_layer_name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        try:
            module.quantize_(value)
        except (ValueError, TypeError) as exc:
            # transformers would fold an exception here into a generic RuntimeError; keep the
            # layer's own message and raise it once loading is done.
            self.hf_quantizer.load_errors[module_name] = str(exc)
        release_file_pages(value)
        self.hf_quantizer.heap.layer_done()
        module._is_hf_initialized = True
        for buf in module._buffers.values():
            buf._is_hf_initialized = True
        if missing_keys is not None:
            for tensor in ("weight", *stored_tensors(module.spec, module.out_features)):
                missing_keys.discard(f"{module_name}.{tensor}")
        return {}


class LayerTensors(ConversionOps):
    """Load-time grouping of one layer's SplitQuant tensors: handed on unchanged, under their own names.

    transformers builds one key transform per checkpoint tensor that no conversion matches (a regex
    compiled for each); matched by this one conversion, a layer's three tensors cost one. Saving
    reverses it into the same pass-through.
    """

    def convert(self, input_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return input_dict

    @property
    def reverse_op(self) -> ConversionOps:
        return self

    @staticmethod
    def used_by(conversion: Any) -> bool:
        return any(isinstance(op, LayerTensors) for op in getattr(conversion, "operations", ()))

    def __deepcopy__(self, memo: dict[int, Any]) -> LayerTensors:
        return LayerTensors()  # no state


class LayerConverter(WeightConverter):
    """The conversion of :class:`LayerTensors`, cheap to deep-copy.

    transformers deep-copies the matching conversion for every checkpoint key (three per layer) and
    keeps one copy per layer. A generic ``deepcopy`` walks every attribute of every copy; this
    copies the mutable containers and shares the immutable parts (strings, the compiled pattern).
    """

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> LayerConverter:
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name in _slot_names(type(self)):
            try:
                value = getattr(self, name)
            except AttributeError:
                continue
            object.__setattr__(new, name, _copied(value, memo))
        return new


@functools.cache
def _slot_names(cls: type) -> tuple[str, ...]:
    return tuple(name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ()))


def _copied(value: Any, memo: dict[int, Any]) -> Any:
    """A deep copy of ``value``: immutable values shared, empty containers made anew, the rest deep-copied."""
    if value is None or isinstance(value, (str, int, float, bool, re.Pattern)):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, defaultdict) and not value:
        return defaultdict(value.default_factory)
    return copy.deepcopy(value, memo)
