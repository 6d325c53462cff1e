"""``SplitQuantModule``: the compact tensors of one quantized layer, shared by every layer kind.

Read the package in this order to follow a weight:

1. here: a float weight reaches :meth:`SplitQuantModule.quantize_` (from ``from_float``, or from the
   transformers quantizer while a float checkpoint streams in), is seen as a matrix of
   ``out_features`` rows by ``in_features`` weights (:mod:`.geometry`), quantized by
   :func:`optimum_splitquant.core.quantize_weight` and kept as the stored tensors of
   :mod:`optimum_splitquant.checkpoint.format` (``weight_packed``, ``weight_scale``, ``weight_offset``,
   the float ``bias``; with coded ranges ``weight_range_codes`` and ``weight_range_steps`` instead of
   the scales and offsets). A checkpoint fills the same buffers (``load_state_dict``, or the
   quantizer); the packed bytes' layout is in :mod:`optimum_splitquant.core.packing`.
2. :mod:`.compute`: how the compact tensors become a float weight or ``x @ W.T + b`` on each device.
   A layer chooses its :class:`~.compute.ComputePath` and its forward strategy once
   (:meth:`SplitQuantModule.select_compute_`): when it is built, quantized or loaded, when
   ``model.to(...)`` moves or casts it, and when the weight cache is added or dropped.
3. :mod:`.linear` and :mod:`.conv`: each layer kind's ``forward`` runs the chosen strategy.

The layer holds only the stored tensors. With coded ranges (``spec.range_bits``, formats 2 and 3)
the scales and offsets are decoded from the stored codes by :meth:`SplitQuantModule.ranges` for each
use (a forward pass, a dequantization, a check) and dropped afterwards, through the one decoder
:func:`optimum_splitquant.core.ranges.decode_layer_ranges`; ``get_memory_footprint`` counts what is
stored.

While a float checkpoint streams in, the layer also carries a float ``weight`` parameter (usually on
the meta device) that :meth:`SplitQuantModule.quantize_` consumes and deletes.

Optional non-persistent buffer: ``weight_cache`` (float ``(out_features, in_features)``), kept by
:meth:`SplitQuantModule.cache_weight_` (opt-in: it costs as much as the float weight).

A layer quantized in this process records how far its dequantized weight lies from the float
weight it was given (:class:`~.quality.QuantizationError`, attribute ``quantization_error``); the
checks of stored tensors live in :mod:`.validation`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..checkpoint.format import (
    BIAS,
    COLUMN_SCALE,
    OFFSET,
    RANGE_CODES,
    RANGE_STEPS,
    SCALE,
    layer_tensors,
    stored_tensors,
)
from ..core.quantize import QuantizedWeight, quantize_weight
from ..core.ranges import decode_layer_ranges
from ..core.spec import QuantSpec
from .compute import AUTO, CPU_KERNELS, ComputePath, dequantize_compact, select_path
from .geometry import VIEWS, MatrixView
from .quality import QuantizationError, measure_error
from .validation import check_layer

__all__ = ["SplitQuantModule", "disable_weight_cache", "enable_weight_cache", "select_compute"]

_CACHE = "weight_cache"


class SplitQuantModule(nn.Module):
    """Base of the quantized layers: compact buffers, quantizing, the compute choice, dequantization, sizes.

    A subclass sets :attr:`source` (the name of its :class:`~.geometry.MatrixView`) and defines
    ``_forward_packed`` / ``_forward_cached`` (its forward pass from the compact tensors, and from the
    weight cache).
    """

    source = "linear"
    """The layer kind this layer replaced (``"linear"``, ``"conv1d"``, ``"conv2d"``): names its matrix view."""
    _weight_noun = "weight"
    quantization_error: QuantizationError | None = None
    """Set by :meth:`quantize_`; ``None`` for a layer read from a checkpoint."""
    compute_path: ComputePath = AUTO
    """How this layer computes (chosen by :meth:`select_compute_`)."""
    _forward_strategy: Callable[[SplitQuantModule, torch.Tensor], torch.Tensor]
    weight_packed: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        spec: QuantSpec,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        # Meta tensors hold no values: empty() there skips zeros()' decomposition (a fifth of a load's rebuild).
        new = torch.empty if torch.device(device or "cpu").type == "meta" else torch.zeros
        for name, layout in layer_tensors(out_features, in_features, spec, bias=False).items():
            stored = torch.uint8 if layout.file_dtypes == ("U8",) else spec.scale_dtype
            self.register_buffer(name, new(layout.shape, dtype=stored, device=device))
        if bias:
            self.bias = nn.Parameter(new(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter(BIAS, None)

    # Geometry -------------------------------------------------------------------------------------

    @property
    def view(self) -> MatrixView:
        """How the replaced layer's float weight maps onto this layer's rows (:mod:`.geometry`)."""
        return VIEWS[self.source]

    @property
    def float_shape(self) -> tuple[int, ...]:
        """Shape of the float weight in the replaced layer's own layout."""
        return self.view.float_shape(self)

    def _add_float_placeholder(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        # Set directly: the ``weight`` property would shadow a normal registration.
        self._parameters["weight"] = nn.Parameter(
            torch.empty(self.float_shape, device=device, dtype=dtype), requires_grad=False
        )

    @property
    def weight(self) -> torch.Tensor:
        """The float weight in the replaced layer's layout, dequantized on each access (a copy).

        Writing into it changes nothing stored. Before quantization it is the float placeholder.
        """
        placeholder = self._parameters.get("weight")
        if placeholder is not None:
            return placeholder
        return self.view.from_rows(self.dequantize_weight(self._float_dtype()), self.float_shape)

    @property
    def is_quantized(self) -> bool:
        """False while a float ``weight`` still waits to be quantized."""
        return "weight" not in self._parameters

    @property
    def coded(self) -> bool:
        """Whether the ranges are stored as codes (``spec.range_bits``, formats 2 and 3)."""
        return self.spec.range_bits is not None

    def _float_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.float32

    # The compute choice -----------------------------------------------------------------------------

    def select_compute_(self) -> None:
        """Choose how this layer computes, from its state now; ``forward`` then runs the choice as it is.

        The path is the fastest one for the stored tensors' device with the kernels' switches as they
        are (:func:`~.compute.select_path`; tensors on the meta device, such as an offloaded layer's,
        choose per call); the strategy is the weight cache when one is kept, else the compact tensors.
        Runs when the layer is built, quantized or loaded, after ``model.to(...)`` and when the cache
        changes; call it (or :func:`select_compute`) after changing ``OPTIMUM_SPLITQUANT_KERNELS`` /
        ``OPTIMUM_SPLITQUANT_TRITON`` in a running process, or after replacing the stored tensors by hand.
        """
        self.compute_path = select_path(self.weight_packed.device)
        if not self.is_quantized:
            self._forward_strategy = _unquantized
        elif _CACHE in self._buffers:
            self._forward_strategy = type(self)._forward_cached
        else:
            self._forward_strategy = type(self)._forward_packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_strategy(self, x)

    def _forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_cached(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self.select_compute_()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # ``model.to(dtype)`` also casts the scales or steps; rebuild the cache so it stays the dequantized weight.
        result = super()._apply(fn, recurse)
        self.select_compute_()
        cache = self._buffers.get(_CACHE)
        if cache is not None:
            self._buffers[_CACHE] = self._dequantize_packed(cache.dtype).to(cache.device)
        return result

    # Stored tensors ---------------------------------------------------------------------------------

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, offset)`` ``(out_features, G, num_clusters)``: the stored ones, or decoded from the codes.

        With coded ranges they are decoded now (new tensors, in the steps' dtype; nothing is kept);
        otherwise they are the ``weight_scale`` / ``weight_offset`` buffers themselves.
        """
        if not self.coded:
            return self._buffers[SCALE], self._buffers[OFFSET]
        codes, steps = self._buffers[RANGE_CODES], self._buffers[RANGE_STEPS]
        groups = self.spec.num_groups(self.in_features)
        compiled = None if self.compute_path is AUTO else self.compute_path is CPU_KERNELS
        return decode_layer_ranges(codes, steps, self.out_features, groups, self.spec, compiled=compiled)

    def quantize_(self, weight: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Quantize ``weight`` (in the replaced layer's own layout) into the buffers; drops the float weight.

        ``ids`` (shape ``(out_features, in_features)``) overrides the clustering. Records the
        reconstruction error in :attr:`quantization_error`.
        """
        if tuple(weight.shape) != tuple(self.float_shape):
            raise ValueError(
                f"expected a {self._weight_noun} of shape {tuple(self.float_shape)}, got {tuple(weight.shape)}"
            )
        rows = self.view.rows(weight.detach())
        q = quantize_weight(rows, self.spec, ids=ids)
        self.quantization_error = measure_error(rows, q, self.spec)
        del rows
        self._buffers.pop(_CACHE, None)
        device = weight.device
        self.weight_packed = q.packed.to(device)
        if self.coded:
            self.weight_range_codes = q.range_codes.to(device)
            self.weight_range_steps = q.range_steps.to(device)
        else:
            self.weight_scale = q.scale.to(device)
            self.weight_offset = q.offset.to(device)
        if q.column_scale is not None:
            self.weight_column_scale = q.column_scale.to(device)
        self._parameters.pop("weight", None)
        self.select_compute_()

    def _copy_bias(self, module: nn.Module) -> None:
        bias = getattr(module, "bias", None)
        if bias is not None:
            self.bias.data.copy_(bias.detach())

    def validate(self, dtype: torch.dtype | None = None) -> None:
        """Raise ``ValueError`` if the stored tensors cannot come from a valid quantization.

        Checks that scales and offsets are finite, scales are non-negative, every rebuilt weight is
        finite in ``dtype`` (the compute dtype; default float32, the dtype weights are rebuilt in)
        and every cluster id, padding symbols included, is below ``num_clusters`` (:mod:`.validation`).
        """
        check_layer(self, dtype)

    def column_scale(self) -> torch.Tensor | None:
        """The stored scale of every input column (``weight_column_scale``, format 4), or ``None``."""
        return self._buffers.get(COLUMN_SCALE)

    def quantized_weight(self) -> QuantizedWeight:
        """The compact tensors (with coded ranges: the scales and offsets decoded now, and the codes)."""
        scale, offset = self.ranges()
        codes, steps = (self.weight_range_codes, self.weight_range_steps) if self.coded else (None, None)
        return QuantizedWeight(self.weight_packed, scale, offset, self.in_features, codes, steps, self.column_scale())

    # Float forms ------------------------------------------------------------------------------------

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out_features, in_features)`` float weight this layer computes with (a new tensor)."""
        cache = self._buffers.get(_CACHE)
        if cache is not None:
            return cache.to(dtype, copy=True)
        return self._dequantize_packed(dtype)

    def _dequantize_packed(self, dtype: torch.dtype) -> torch.Tensor:
        scale, offset = self.ranges()
        return dequantize_compact(
            self.weight_packed,
            scale,
            offset,
            self.in_features,
            self.spec,
            dtype,
            column_scale=self.column_scale(),
            path=self.compute_path,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The float layer type this layer replaced (its float twin), holding the dequantized weight and float bias."""
        if dtype is None:
            dtype = self._float_dtype()
        twin = self.view.empty_float(self, self.weight_packed.device, dtype)
        with torch.no_grad():
            twin.weight.copy_(self.view.from_rows(self.dequantize_weight(dtype), self.float_shape))
            if self.bias is not None:
                twin.bias.copy_(self.bias)
        return twin

    def cache_weight_(self, dtype: torch.dtype | None = None) -> int:
        """Opt-in speed: keep the dequantized weight in memory; returns the bytes it costs.

        The cache is a non-persistent buffer (never saved, counted by ``get_memory_footprint``,
        cast by ``model.to(dtype)``); ``dtype`` defaults to the bias dtype or fp32.
        """
        if not self.is_quantized:
            raise RuntimeError("cannot cache the weight of a layer that was never quantized")
        if dtype is None:
            dtype = self._float_dtype()
        self._buffers.pop(_CACHE, None)
        w = self._dequantize_packed(dtype)
        self.register_buffer(_CACHE, w, persistent=False)
        self.select_compute_()
        return w.numel() * w.element_size()

    def clear_weight_cache_(self) -> None:
        """Drop the dequantized weight kept by :meth:`cache_weight_` (no-op without one)."""
        if self._buffers.pop(_CACHE, None) is not None:
            self.select_compute_()

    # Sizes ------------------------------------------------------------------------------------------

    def storage_bits(self) -> int:
        """Bits stored for the weight: packed codes and ids, scales and offsets or their codes (bias excluded)."""
        tensors = [getattr(self, name) for name in stored_tensors(self.spec, self.out_features)]
        return sum(t.numel() * t.element_size() * 8 for t in tensors)

    def effective_bits(self) -> float:
        """Stored weight bits divided by the number of original weights."""
        n = self.in_features * self.out_features
        return self.storage_bits() / n if n else 0.0

    def _settings_repr(self) -> str:
        s = self.spec
        group = "row" if s.group_size is None else s.group_size
        coded = "" if s.range_bits is None else f", range_bits={s.range_bits}, range_block={s.range_block}"
        return f"bits={s.bits}, num_clusters={s.num_clusters}, group={group}, clustering={s.clustering}{coded}"


def _unquantized(layer: SplitQuantModule, x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError(f"{type(layer).__name__} was never given its weight: call quantize_() or load a checkpoint")


def enable_weight_cache(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Cache the dequantized weight of every SplitQuant layer in ``model``; returns the bytes added.

    Trades memory for speed: the cached layers run a plain float op (no dequantization) and hold
    ``out * in`` floats each again, as much as the float model's weights.
    """
    return sum(m.cache_weight_(dtype) for m in model.modules() if isinstance(m, SplitQuantModule) and m.is_quantized)


def disable_weight_cache(model: nn.Module) -> None:
    """Drop every cache added by :func:`enable_weight_cache`."""
    for m in model.modules():
        if isinstance(m, SplitQuantModule):
            m.clear_weight_cache_()


def select_compute(model: nn.Module) -> None:
    """:meth:`SplitQuantModule.select_compute_` of every SplitQuant layer in ``model``."""
    for m in model.modules():
        if isinstance(m, SplitQuantModule):
            m.select_compute_()
