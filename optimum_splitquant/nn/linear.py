"""``SplitQuantLinear``: a linear layer stored in SplitQuant's compact form.

Stores the tensors of :mod:`optimum_splitquant.checkpoint.format` (``weight_packed``,
``weight_scale``, ``weight_offset``, the float ``bias``) with ``rows = out_features`` and
``width = in_features``; buffers and quantizing come from :class:`~.compact.SplitQuantModule`.

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
* CUDA tensors with ``triton`` installed (:mod:`optimum_splitquant.kernels.triton_ops`, switch
  ``OPTIMUM_SPLITQUANT_TRITON``): a fused Triton op for at most 8 tokens without gradient, else a
  Triton dequantize (bit-identical, in the input dtype) and one ``F.linear``.
* otherwise: dequantize (compiled kernel when available, bit-identical to the pure-torch
  :func:`~optimum_splitquant.core.dequantize_weight`), then one ``F.linear``. When a gradient is
  wanted for the input (adapters training on top), the backward pass dequantizes the weight again
  rather than keeping the float weight alive between forward and backward.
* opt-in :meth:`~.compact.SplitQuantModule.cache_weight_` (or :func:`enable_weight_cache` for a
  whole model): keeps the dequantized weight as a non-persistent buffer ``weight_cache`` and runs a
  plain ``F.linear`` on it. Costs ``out_features * in_features`` floats per layer (fp32: 4 bytes per
  weight, 5 to 16x the packed size); counted by ``get_memory_footprint``, never saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..core.spec import QuantSpec
from ..kernels import triton_ops
from .compact import _CACHE, SplitQuantModule, disable_weight_cache, enable_weight_cache

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

    @classmethod
    def from_float(
        cls, module: nn.Module, spec: QuantSpec, *, source: str = "linear", ids: torch.Tensor | None = None
    ) -> SplitQuantLinear:
        """Quantize a float ``nn.Linear`` (or ``Conv1D`` with ``source="conv1d"``)."""
        weight = module.weight.detach()
        in_f, out_f = weight.shape if source == "conv1d" else weight.shape[::-1]
        bias = getattr(module, "bias", None) is not None
        layer = cls(in_f, out_f, bias, spec=spec, source=source, device=weight.device, dtype=weight.dtype)
        layer._copy_bias(module)
        layer.quantize_(weight, ids=ids)
        return layer

    @property
    def float_shape(self) -> tuple[int, int]:
        if self.source == "conv1d":
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.source == "conv1d" else weight

    _from_rows = _rows  # a transpose is its own inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_quantized()
        self._ensure_ranges()
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        cache = self._buffers.get(_CACHE)
        if cache is not None:
            return F.linear(x, cache if cache.dtype == x.dtype else cache.to(x.dtype), bias)
        if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _RecomputedLinear.apply(x, bias, self)
        if x.device.type == "cuda" and self.weight_packed.device.type == "cuda" and triton_ops.available():
            packed, scale, offset = self.weight_packed, self.weight_scale, self.weight_offset
            spec = self.spec
            return triton_ops.forward(x, packed, scale, offset, bias, self.in_features, spec.bits, spec.symbol_width)
        if x.dtype == torch.float32 and 0 < x.numel() <= self.fused_max_tokens * self.in_features and self._fused_ok(x):
            y = kernels.linear(
                x.reshape(-1, self.in_features),
                self.weight_packed,
                self.weight_scale,
                self.weight_offset,
                bias,
                self.in_features,
                self.spec.bits,
                self.spec.symbol_width,
            )
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self._dequantize_packed(x.dtype), bias)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """The fused kernel applies: CPU tensors, no gradient wanted, kernels loaded."""
        return (
            x.device.type == "cpu"
            and self.weight_packed.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())
            and kernels.available()
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (and the float bias)."""
        if dtype is None:
            dtype = self._float_dtype()
        layer = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight_packed.device,
            dtype=dtype,
        )
        return self._filled(layer, self.dequantize_weight(dtype))

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
        return F.linear(x, layer._dequantize_packed(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer._dequantize_packed(grad.dtype)
        if ctx.bias_shape is not None and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None
