"""The vLLM layer's arithmetic, without vLLM: the forward pass.

The forward pass uses the fastest path the package has for the tensors at hand, as
:class:`~optimum_splitquant.nn.SplitQuantLinear` does:

* CUDA tensors with Triton (:mod:`optimum_splitquant.kernels.triton_ops`): its fused op or its
  dequantize, then one GEMM.
* CPU, fp32 input of at most :data:`FUSED_MAX_TOKENS` tokens, compiled kernels loaded
  (:mod:`optimum_splitquant.kernels`): one fused op reading the packed bytes (fp32 summation order
  differs from the plain path by ~1e-6 relative).
* otherwise: dequantize (compiled kernel when loaded, else :func:`~optimum_splitquant.core.dequantize_weight`,
  bit-identical), then one ``F.linear`` in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..core.spec import QuantSpec
from ..kernels import triton_ops
from ..nn.compact import dequantize_compact

__all__ = ["FUSED_MAX_TOKENS", "linear"]

FUSED_MAX_TOKENS = 32
"""Calls with at most this many fp32 tokens use the fused CPU kernel: it beats dequantize + GEMM up to
about 32 tokens on 2 cores (:mod:`optimum_splitquant.nn.linear`), which covers a decode step of a batch
of up to 32 sequences; a prefill of more tokens dequantizes once and runs one GEMM."""


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    spec: QuantSpec,
    fused_max_tokens: int = FUSED_MAX_TOKENS,
) -> torch.Tensor:
    """``x @ W.T + bias`` for the weight stored in ``packed`` / ``scale`` / ``offset`` (see the module docstring)."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if x.device.type == "cuda" and packed.device.type == "cuda" and triton_ops.available():
        return triton_ops.forward(x, packed, scale, offset, bias, in_features, spec.bits, spec.symbol_width)
    tokens = x.numel() // in_features if in_features else 0
    if (
        x.dtype == torch.float32
        and 0 < tokens <= fused_max_tokens
        and x.device.type == "cpu"
        and packed.device.type == "cpu"
        and kernels.available()
    ):
        flat = x.reshape(tokens, in_features).contiguous()
        y = kernels.linear(flat, packed, scale, offset, bias, in_features, spec.bits, spec.symbol_width)
        return y.view(*x.shape[:-1], packed.shape[0])
    return F.linear(x, dequantize_compact(packed, scale, offset, in_features, spec, x.dtype), bias)
