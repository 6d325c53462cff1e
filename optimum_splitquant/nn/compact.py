"""``SplitQuantModule``: the compact tensors of one quantized layer, shared by every layer kind.

The stored tensors (``weight_packed``, ``weight_scale``, ``weight_offset`` and the float
``bias``) are declared, with their shapes and dtypes, in :mod:`optimum_splitquant.checkpoint.format`;
this class allocates exactly those. Every layer kind sees its float weight as a matrix of
``out_features`` rows by ``in_features`` weights (for ``Conv2d`` a row is one flattened output
kernel); a subclass says how its float weight maps onto those rows and how it computes.

While a float checkpoint streams in, the layer also carries a float ``weight`` parameter (usually
on the meta device) that :meth:`SplitQuantModule.quantize_` consumes and deletes.

Optional non-persistent buffer: ``weight_cache`` (float ``(out_features, in_features)``), kept by
:meth:`SplitQuantModule.cache_weight_`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..checkpoint.format import BIAS, OFFSET, PACKED, QUANTIZED_TENSORS, SCALE, layer_tensors
from ..core.quantize import QuantizedWeight, decode_symbols, dequantize_weight, quantize_weight
from ..core.spec import QuantSpec

__all__ = ["SplitQuantModule"]

_CACHE = "weight_cache"


class SplitQuantModule(nn.Module):
    """Base of the quantized layers: compact buffers, quantizing, validation, dequantization, sizes."""

    _weight_noun = "weight"
    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_offset: torch.Tensor

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
        stored = {PACKED: torch.uint8, SCALE: spec.scale_dtype, OFFSET: spec.scale_dtype}
        for name, layout in layer_tensors(out_features, in_features, spec, bias=False).items():
            self.register_buffer(name, torch.zeros(layout.shape, dtype=stored[name], device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter(BIAS, None)

    # What a layer kind defines -------------------------------------------------------------------

    @property
    def float_shape(self) -> tuple[int, ...]:
        """Shape of the float weight in the replaced layer's own layout."""
        raise NotImplementedError

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The float weight (in :attr:`float_shape`) as ``(out_features, in_features)`` rows."""
        raise NotImplementedError

    def _from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_rows`."""
        raise NotImplementedError

    # Shared -------------------------------------------------------------------------------------

    def _add_float_placeholder(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        # Set directly: the subclasses' ``weight`` property would shadow a normal registration.
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
        return self._from_rows(self.dequantize_weight(self._float_dtype()))

    @property
    def is_quantized(self) -> bool:
        """False while a float ``weight`` still waits to be quantized."""
        return "weight" not in self._parameters

    def _float_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.float32

    def quantize_(self, weight: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Quantize ``weight`` (in the replaced layer's own layout) into the buffers; drops the float weight.

        ``ids`` (shape ``(out_features, in_features)``) overrides the clustering.
        """
        if tuple(weight.shape) != tuple(self.float_shape):
            raise ValueError(
                f"expected a {self._weight_noun} of shape {tuple(self.float_shape)}, got {tuple(weight.shape)}"
            )
        q = quantize_weight(self._rows(weight.detach()), self.spec, ids=ids)
        self.clear_weight_cache_()
        device = weight.device
        self.weight_packed = q.packed.to(device)
        self.weight_scale = q.scale.to(device)
        self.weight_offset = q.offset.to(device)
        self._parameters.pop("weight", None)

    def _copy_bias(self, module: nn.Module) -> None:
        bias = getattr(module, "bias", None)
        if bias is not None:
            self.bias.data.copy_(bias.detach())

    def _filled(self, layer: nn.Module, weight: torch.Tensor) -> nn.Module:
        """``layer`` (a new float layer) given ``weight`` and this layer's float bias."""
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def validate(self) -> None:
        """Raise ``ValueError`` if the stored tensors cannot come from a valid quantization.

        Checks that scales and offsets are finite, scales are non-negative and every cluster id is
        below ``num_clusters`` (codes cannot exceed ``bits`` by construction of the packing).
        """
        for name in (SCALE, OFFSET):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"{name} holds NaN or infinite values")
        if bool((self.weight_scale < 0).any()):
            raise ValueError(f"{SCALE} holds negative values")
        if self.spec.num_clusters < (1 << self.spec.id_bits) and self.weight_packed.numel():
            ids, _ = decode_symbols(self.weight_packed, self.in_features, self.spec)
            top = int(ids.max())
            if top >= self.spec.num_clusters:
                raise ValueError(
                    f"{PACKED} holds cluster id {top}, but num_clusters={self.spec.num_clusters}: "
                    "the codes do not match the declared settings"
                )

    def quantized_weight(self) -> QuantizedWeight:
        """The stored compact tensors."""
        return QuantizedWeight(self.weight_packed, self.weight_scale, self.weight_offset, self.in_features)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out_features, in_features)`` float weight this layer computes with (a new tensor)."""
        cache = self._buffers.get(_CACHE)
        if cache is not None:
            return cache.to(dtype, copy=True)
        return self._dequantize_packed(dtype)

    def _dequantize_packed(self, dtype: torch.dtype) -> torch.Tensor:
        packed = self.weight_packed
        if packed.device.type == "cpu" and kernels.available():
            w = kernels.dequantize(
                packed, self.weight_scale, self.weight_offset, self.in_features, self.spec.bits, self.spec.symbol_width
            )
            return w if dtype == torch.float32 else w.to(dtype)
        return dequantize_weight(packed, self.weight_scale, self.weight_offset, self.in_features, self.spec, dtype)

    def _check_quantized(self) -> None:
        if not self.is_quantized:
            raise RuntimeError(
                f"{type(self).__name__} was never given its weight: call quantize_() or load a checkpoint"
            )

    def cache_weight_(self, dtype: torch.dtype | None = None) -> int:
        """Opt-in speed: keep the dequantized weight in memory; returns the bytes it costs.

        The cache is a non-persistent buffer (never saved, counted by ``get_memory_footprint``,
        cast by ``model.to(dtype)``); ``dtype`` defaults to the bias dtype or fp32.
        """
        if not self.is_quantized:
            raise RuntimeError("cannot cache the weight of a layer that was never quantized")
        if dtype is None:
            dtype = self._float_dtype()
        self.clear_weight_cache_()
        w = self._dequantize_packed(dtype)
        self.register_buffer(_CACHE, w, persistent=False)
        return w.numel() * w.element_size()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # ``model.to(dtype)`` also casts the scales; rebuild the cache so it stays the dequantized weight.
        result = super()._apply(fn, recurse)
        cache = self._buffers.get(_CACHE)
        if cache is not None:
            self._buffers[_CACHE] = self._dequantize_packed(cache.dtype).to(cache.device)
        return result

    def clear_weight_cache_(self) -> None:
        """Drop the dequantized weight kept by :meth:`cache_weight_` (no-op without one)."""
        self._buffers.pop(_CACHE, None)

    def storage_bits(self) -> int:
        """Bits stored for the weight: packed codes and ids, scales and offsets (bias excluded)."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() * 8 for name in QUANTIZED_TENSORS)

    def effective_bits(self) -> float:
        """Stored weight bits divided by the number of original weights."""
        n = self.in_features * self.out_features
        return self.storage_bits() / n if n else 0.0

    def _settings_repr(self) -> str:
        s = self.spec
        group = "row" if s.group_size is None else s.group_size
        return f"bits={s.bits}, num_clusters={s.num_clusters}, group={group}, clustering={s.clustering}"


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
