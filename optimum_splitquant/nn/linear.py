"""``SplitQuantLinear``: a linear layer stored in SplitQuant's compact form.

Stored tensors (names as in ``state_dict``; ``k = num_clusters``, ``G = in / group_size`` or 1,
``w = bits + ceil(log2 k)``):

========================  ==================  ============================================
name                      dtype               shape
========================  ==================  ============================================
``weight_packed``         ``uint8``           ``(out_features, ceil(in_features / 8) * w)``
``weight_scale``          scale dtype (fp16)  ``(out_features, G, k)``
``weight_offset``         scale dtype (fp16)  ``(out_features, G, k)``
``bias`` (parameter)      float               ``(out_features,)``, only if the layer has one
========================  ==================  ============================================

``weight_packed`` holds, per weight, ``cluster_id << bits | code`` packed as documented in
:mod:`optimum_splitquant.core.packing`; the dequantized weight is
``offset[row, group, id] + code * scale[row, group, id]`` (see
:mod:`optimum_splitquant.core.quantize`). The bias is kept in float: it is ``out_features``
numbers, and exact. While a float checkpoint streams in, the layer also carries a float
``weight`` parameter (usually on the meta device) that :meth:`SplitQuantLinear.quantize_`
consumes and deletes.

``source`` records what the layer replaced (``"linear"`` for ``nn.Linear``, ``"conv1d"`` for
GPT-2 style ``Conv1D`` whose weight is stored ``(in, out)``); the packed rows are always output
channels, and the forward pass is the same.

Forward paths (all compute with the same dequantized weight):

* CPU, compiled kernels available (:mod:`optimum_splitquant.kernels`), fp32 input of at most
  ``fused_max_tokens`` tokens (default :data:`FUSED_MAX_TOKENS` = 1, the decode step): one fused op
  reads the packed bytes (no float weight is ever materialised); it differs from the plain path
  only in fp32 summation order (~1e-6 relative). The kernel also beats dequantize + GEMM up to
  about 32 tokens on 2 cores; raise ``layer.fused_max_tokens`` (per layer) to use it there, at the
  price of outputs that are no longer bit-identical to the dequantized float twin for 2-32 tokens.
* otherwise: dequantize (compiled kernel when available, bit-identical to the pure-torch
  :func:`~optimum_splitquant.core.dequantize_weight`), then one ``F.linear``.
* opt-in :meth:`SplitQuantLinear.cache_weight_` (or :func:`enable_weight_cache` for a whole
  model): keeps the dequantized weight as a non-persistent buffer ``weight_cache`` and runs a plain
  ``F.linear`` on it. Costs ``out_features * in_features`` floats per layer (fp32: 4 bytes per
  weight, 5 to 16x the packed size); counted by ``get_memory_footprint``, never saved.

Optional non-persistent buffer: ``weight_cache`` (float ``(out_features, in_features)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..core.packing import packed_row_bytes
from ..core.quantize import QuantizedWeight, decode_symbols, dequantize_weight, quantize_weight
from ..core.spec import QuantSpec

__all__ = ["FUSED_MAX_TOKENS", "SplitQuantLinear", "disable_weight_cache", "enable_weight_cache"]

SOURCES = ("linear", "conv1d")
FUSED_MAX_TOKENS = 1
"""Default ``SplitQuantLinear.fused_max_tokens``: the fused kernel serves single-token (decode) calls."""
_CACHE = "weight_cache"


class SplitQuantLinear(nn.Module):
    """Linear layer whose weight is split into clusters and quantized per cluster (one matmul)."""

    fused_max_tokens: int = FUSED_MAX_TOKENS
    """Calls with at most this many fp32 tokens use the fused kernel (when compiled kernels are available)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        spec: QuantSpec,
        source: str = "linear",
        float_weight: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.source = source
        groups = spec.num_groups(in_features)
        row_bytes = packed_row_bytes(in_features, spec.symbol_width)
        k = spec.num_clusters
        self.register_buffer("weight_packed", torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.register_buffer(
            "weight_scale", torch.zeros(out_features, groups, k, dtype=spec.scale_dtype, device=device)
        )
        self.register_buffer(
            "weight_offset", torch.zeros(out_features, groups, k, dtype=spec.scale_dtype, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        if float_weight:
            shape = (out_features, in_features) if source == "linear" else (in_features, out_features)
            # Set directly: the ``weight`` property below would shadow a normal registration.
            self._parameters["weight"] = nn.Parameter(
                torch.empty(shape, device=device, dtype=dtype), requires_grad=False
            )

    @classmethod
    def from_float(
        cls, module: nn.Module, spec: QuantSpec, *, source: str = "linear", ids: torch.Tensor | None = None
    ) -> SplitQuantLinear:
        """Quantize a float ``nn.Linear`` (or ``Conv1D`` with ``source="conv1d"``)."""
        weight = module.weight.detach()
        if source == "conv1d":
            in_f, out_f = weight.shape
        else:
            out_f, in_f = weight.shape
        bias = getattr(module, "bias", None)
        layer = cls(in_f, out_f, bias is not None, spec=spec, source=source, device=weight.device, dtype=weight.dtype)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        layer.quantize_(weight, ids=ids)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The float weight in the replaced layer's layout, dequantized on each access (a copy).

        Writing into it changes nothing stored. Before quantization it is the float placeholder.
        """
        placeholder = self._parameters.get("weight")
        if placeholder is not None:
            return placeholder
        w = self.dequantize_weight(self.bias.dtype if self.bias is not None else torch.float32)
        return w.t() if self.source == "conv1d" else w

    @property
    def is_quantized(self) -> bool:
        """False while a float ``weight`` still waits to be quantized."""
        return "weight" not in self._parameters

    def quantize_(self, weight: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Quantize ``weight`` (in the replaced layer's own layout) into the buffers; drops the float weight."""
        expected = (
            (self.out_features, self.in_features) if self.source == "linear" else (self.in_features, self.out_features)
        )
        if tuple(weight.shape) != expected:
            raise ValueError(f"expected a weight of shape {expected}, got {tuple(weight.shape)}")
        w = weight.detach()
        if self.source == "conv1d":
            w = w.t()
        q = quantize_weight(w, self.spec, ids=ids)
        self.clear_weight_cache_()
        device = weight.device
        self.weight_packed = q.packed.to(device)
        self.weight_scale = q.scale.to(device)
        self.weight_offset = q.offset.to(device)
        self._parameters.pop("weight", None)

    def validate(self) -> None:
        """Raise ``ValueError`` if the stored tensors cannot come from a valid quantization.

        Checks that scales and offsets are finite, scales are non-negative and every cluster id is
        below ``num_clusters`` (codes cannot exceed ``bits`` by construction of the packing).
        """
        for name in ("weight_scale", "weight_offset"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"{name} holds NaN or infinite values")
        if bool((self.weight_scale < 0).any()):
            raise ValueError("weight_scale holds negative values")
        if self.spec.num_clusters < (1 << self.spec.id_bits) and self.weight_packed.numel():
            ids, _ = decode_symbols(self.weight_packed, self.in_features, self.spec)
            top = int(ids.max())
            if top >= self.spec.num_clusters:
                raise ValueError(
                    f"weight_packed holds cluster id {top}, but num_clusters={self.spec.num_clusters}: "
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
            w = kernels.dequantize(packed, self.weight_scale, self.weight_offset, self.in_features, self.spec)
            return w if dtype == torch.float32 else w.to(dtype)
        return dequantize_weight(packed, self.weight_scale, self.weight_offset, self.in_features, self.spec, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "weight" in self._parameters:
            raise RuntimeError("SplitQuantLinear was never given its weight: call quantize_() or load a checkpoint")
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        cache = self._buffers.get(_CACHE)
        if cache is not None:
            return F.linear(x, cache if cache.dtype == x.dtype else cache.to(x.dtype), bias)
        if x.dtype == torch.float32 and 0 < x.numel() <= self.fused_max_tokens * self.in_features and self._fused_ok(x):
            y = kernels.linear(
                x.reshape(-1, self.in_features),
                self.weight_packed,
                self.weight_scale,
                self.weight_offset,
                bias,
                self.in_features,
                self.spec,
            )
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self._dequantize_packed(x.dtype), bias)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """The fused kernel applies: CPU tensors, no gradient wanted, kernels loaded."""
        return (
            not x.is_cuda
            and x.device.type == "cpu"
            and self.weight_packed.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())
            and kernels.available()
        )

    def cache_weight_(self, dtype: torch.dtype | None = None) -> int:
        """Opt-in speed: keep the dequantized weight in memory; returns the bytes it costs.

        The cache is a non-persistent buffer (never saved, counted by ``get_memory_footprint``,
        cast by ``model.to(dtype)``); ``dtype`` defaults to the bias dtype or fp32.
        """
        if not self.is_quantized:
            raise RuntimeError("cannot cache the weight of a layer that was never quantized")
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
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

    def dequantize(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (and the float bias)."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
        layer = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight_packed.device,
            dtype=dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(self.dequantize_weight(dtype))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def storage_bits(self) -> int:
        """Bits stored for the weight: packed codes and ids, scales and offsets (bias excluded)."""
        return sum(
            t.numel() * t.element_size() * 8 for t in (self.weight_packed, self.weight_scale, self.weight_offset)
        )

    def effective_bits(self) -> float:
        """Stored weight bits divided by the number of original weights."""
        n = self.in_features * self.out_features
        return self.storage_bits() / n if n else 0.0

    def extra_repr(self) -> str:
        s = self.spec
        group = "row" if s.group_size is None else s.group_size
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={s.bits}, num_clusters={s.num_clusters}, group={group}, clustering={s.clustering}, "
            f"source={self.source}"
        )


def enable_weight_cache(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Cache the dequantized weight of every :class:`SplitQuantLinear` in ``model``; returns the bytes added.

    Trades memory for speed: the cached layers run a plain float ``F.linear`` (no dequantization)
    and hold ``out * in`` floats each again, as much as the float model's linear weights.
    """
    return sum(m.cache_weight_(dtype) for m in model.modules() if isinstance(m, SplitQuantLinear) and m.is_quantized)


def disable_weight_cache(model: nn.Module) -> None:
    """Drop every cache added by :func:`enable_weight_cache`."""
    for m in model.modules():
        if isinstance(m, SplitQuantLinear):
            m.clear_weight_cache_()
