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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.packing import packed_row_bytes
from ..core.quantize import QuantizedWeight, decode_symbols, dequantize_weight, quantize_weight
from ..core.spec import QuantSpec

__all__ = ["SplitQuantLinear"]

SOURCES = ("linear", "conv1d")


class SplitQuantLinear(nn.Module):
    """Linear layer whose weight is split into clusters and quantized per cluster (one matmul)."""

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
        """The ``(out_features, in_features)`` float weight this layer computes with."""
        return dequantize_weight(
            self.weight_packed, self.weight_scale, self.weight_offset, self.in_features, self.spec, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:
            raise RuntimeError("SplitQuantLinear was never given its weight: call quantize_() or load a checkpoint")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

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
