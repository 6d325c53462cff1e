"""``SplitQuantLinear``: a linear layer stored in SplitQuant's compact form.

Stores the tensors of :mod:`optimum_splitquant.checkpoint.format` with ``rows = out_features`` and
``width = in_features``; buffers, quantizing and the compute choice come from
:class:`~.compact.SplitQuantModule`.

``source`` records what the layer replaced (``"linear"`` for ``nn.Linear``, ``"conv1d"`` for
GPT-2 style ``Conv1D`` whose weight is stored ``(in, out)``, :mod:`.geometry`); the packed rows are
always output channels, the forward pass is the same, and :meth:`~.compact.SplitQuantModule.dequantize`
gives back the replaced type.

Forward strategies (chosen by :meth:`~.compact.SplitQuantModule.select_compute_`; all compute with the
same dequantized weight):

* the compact tensors: :func:`~.compute.linear_compact` on the layer's path (:mod:`.compute`: the
  fused CPU kernel for fp32 calls of at most :attr:`SplitQuantLinear.fused_max_tokens` tokens,
  default :data:`FUSED_MAX_TOKENS` = 1, the decode step; the Triton ops on CUDA; otherwise
  dequantize and one ``F.linear``). The fused CPU kernel also beats dequantize + GEMM for a few more
  tokens; raise ``layer.fused_max_tokens`` (per layer) to use it there, at the price of outputs that
  are no longer bit-identical to the dequantized float twin. When a gradient is wanted for the input
  (adapters training on top), the backward pass dequantizes the weight again rather than keeping
  the float weight alive between forward and backward.
* opt-in :meth:`~.compact.SplitQuantModule.cache_weight_` (or :func:`enable_weight_cache` for a
  whole model): keeps the dequantized weight as a non-persistent buffer ``weight_cache`` and runs a
  plain ``F.linear`` on it. Costs ``out_features * in_features`` floats per layer (fp32: 4 bytes per
  weight, 5 to 16x the packed size); counted by ``get_memory_footprint``, never saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.spec import QuantSpec
from .compact import _CACHE, SplitQuantModule, disable_weight_cache, enable_weight_cache
from .compute import linear_compact
from .geometry import VIEWS

__all__ = ["FUSED_MAX_TOKENS", "SplitQuantLinear", "disable_weight_cache", "enable_weight_cache"]

SOURCES = ("linear", "conv1d")
FUSED_MAX_TOKENS = 1
"""Default ``SplitQuantLinear.fused_max_tokens``: the fused kernel serves single-token (decode) calls."""


class SplitQuantLinear(SplitQuantModule):
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
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        super().__init__(in_features, out_features, bias, spec=spec, device=device, dtype=dtype)
        self.source = source
        if float_weight:
            self._add_float_placeholder(device, dtype)
        self.select_compute_()

    @classmethod
    def from_float(
        cls, module: nn.Module, spec: QuantSpec, *, source: str = "linear", ids: torch.Tensor | None = None
    ) -> SplitQuantLinear:
        """Quantize a float ``nn.Linear`` (or ``Conv1D`` with ``source="conv1d"``)."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        weight = module.weight.detach()
        out_f, in_f = VIEWS[source].dims(weight.shape)
        bias = getattr(module, "bias", None) is not None
        layer = cls(in_f, out_f, bias, spec=spec, source=source, device=weight.device, dtype=weight.dtype)
        layer._copy_bias(module)
        layer.quantize_(weight, ids=ids)
        return layer

    def _forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _RecomputedLinear.apply(x, bias, self)
        scale, offset = self.ranges()
        return linear_compact(
            x,
            self.weight_packed,
            scale,
            offset,
            bias,
            self.in_features,
            self.spec,
            column_scale=self.column_scale(),
            fused_max_tokens=self.fused_max_tokens,
            path=self.compute_path,
        )

    def _forward_cached(self, x: torch.Tensor) -> torch.Tensor:
        cache = self._buffers[_CACHE]
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, cache if cache.dtype == x.dtype else cache.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self._settings_repr()}, source={self.source}"
        )


class _RecomputedLinear(torch.autograd.Function):
    """``x @ W.T + bias`` whose backward dequantizes ``W`` again instead of keeping it.

    Plain ``F.linear`` on a freshly dequantized weight would keep that float weight alive until the
    backward pass: with adapters training on top (LoRA), every layer's float weight at once. The
    packed weight gets no gradient (it is frozen); ``x`` and a trainable ``bias`` do.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: SplitQuantLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        ctx.bias_shape = None if bias is None else bias.shape
        return F.linear(x, layer.dequantize_weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantize_weight(grad.dtype)
        if ctx.bias_shape is not None and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None
