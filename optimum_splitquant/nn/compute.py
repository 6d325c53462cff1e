"""Stateless compute over one weight's compact tensors: the device paths, dequantizing, ``x @ W.T + b``.

The compact tensors of a weight are ``packed`` (codes and cluster ids, :mod:`optimum_splitquant.core.packing`)
and float ``scale`` / ``offset`` ranges ``(rows, G, k)`` (with coded ranges: decoded by the caller from the
stored codes, :func:`optimum_splitquant.core.ranges.decode_layer_ranges`). Nothing here holds state:
the quantized modules (:mod:`.compact`, :mod:`.linear`, :mod:`.conv`) and the vLLM layer
(:mod:`optimum_splitquant.vllm.compute`) pass their tensors in.

A :class:`ComputePath` is how one device computes; :func:`select_path` picks it once for the device
the tensors live on (a layer does so when it is quantized, loaded or moved):

* ``"triton"``: CUDA tensors with ``triton`` (:mod:`optimum_splitquant.kernels.triton_ops`, switch
  ``OPTIMUM_SPLITQUANT_TRITON``): a fused op for at most ``triton_ops.MAX_TOKENS`` tokens without
  gradient, else a Triton dequantize (bit-identical, in the input dtype) and one ``F.linear``.
* ``"cpu-kernels"``: CPU tensors with the compiled kernels loaded (:mod:`optimum_splitquant.kernels`,
  switch ``OPTIMUM_SPLITQUANT_KERNELS``): fp32 input of at most ``fused_max_tokens`` tokens without
  gradient runs one fused op reading the packed bytes (no float weight is materialised; fp32
  summation order differs from the plain path by ~1e-6 relative); otherwise the compiled dequantize
  (bit-identical to the pure-torch one) and one ``F.linear``.
* ``"torch"``: :func:`optimum_splitquant.core.dequantize_weight`, then one ``F.linear``.
* ``"auto"``: one of the above per call, from the packed tensor's device: for tensors whose device
  is known only at call time (an offload hook brings them in; meta tensors before loading).

:func:`dequantize_compact` and :func:`linear_compact` are the two entry points; every forward pass of
the package goes through one of them (a cached weight was made by :func:`dequantize_compact`). A
layer's column scales ``c`` (format 4, ``W = deq(W') * c[None, :]``) are one optional argument of
each: applied to the weight in :func:`dequantize_compact` (in float32, the same bits as
:func:`optimum_splitquant.core.dequantize_weight`), to ``x`` (``x * c``) in :func:`linear_compact`
for float32 inputs (other dtypes take the scaled weight: ``x * c`` could overflow float16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..core.quantize import dequantize_weight
from ..core.spec import QuantSpec
from ..kernels import triton_ops

__all__ = [
    "AUTO",
    "CPU_KERNELS",
    "TORCH",
    "TRITON",
    "ComputePath",
    "dequantize_compact",
    "linear_compact",
    "select_path",
]


class ComputePath:
    """The pure-torch path: dequantize with :func:`~optimum_splitquant.core.dequantize_weight`, one ``F.linear``."""

    name = "torch"

    def dequantize(
        self,
        packed: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        in_features: int,
        spec: QuantSpec,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The ``(rows, in_features)`` float weight in ``dtype`` (a new tensor)."""
        return dequantize_weight(packed, scale, offset, in_features, spec, dtype)

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        bias: torch.Tensor | None,
        in_features: int,
        spec: QuantSpec,
        fused_max_tokens: int,
    ) -> torch.Tensor:
        """``x @ W.T + bias``; ``bias`` is already in ``x``'s dtype."""
        return F.linear(x, self.dequantize(packed, scale, offset, in_features, spec, x.dtype), bias)

    def __repr__(self) -> str:
        return f"ComputePath({self.name!r})"


class _CpuKernelPath(ComputePath):
    name = "cpu-kernels"

    def dequantize(self, packed, scale, offset, in_features, spec, dtype):  # type: ignore[no-untyped-def]
        w = kernels.dequantize(packed, scale, offset, in_features, spec.bits, spec.symbol_width)
        return w if dtype == torch.float32 else w.to(dtype)

    def linear(self, x, packed, scale, offset, bias, in_features, spec, fused_max_tokens):  # type: ignore[no-untyped-def]
        tokens = x.numel() // in_features if in_features else 0
        if (
            x.dtype == torch.float32
            and 0 < tokens <= fused_max_tokens
            and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())
        ):
            flat = x.reshape(tokens, in_features).contiguous()
            y = kernels.linear(flat, packed, scale, offset, bias, in_features, spec.bits, spec.symbol_width)
            return y.view(*x.shape[:-1], packed.shape[0])
        return super().linear(x, packed, scale, offset, bias, in_features, spec, fused_max_tokens)


class _TritonPath(ComputePath):
    name = "triton"

    def dequantize(self, packed, scale, offset, in_features, spec, dtype):  # type: ignore[no-untyped-def]
        return triton_ops.dequantize(packed, scale, offset, in_features, spec.bits, spec.symbol_width, dtype)

    def linear(self, x, packed, scale, offset, bias, in_features, spec, fused_max_tokens):  # type: ignore[no-untyped-def]
        return triton_ops.forward(x, packed, scale, offset, bias, in_features, spec.bits, spec.symbol_width)


class _AutoPath(ComputePath):
    name = "auto"

    def dequantize(self, packed, scale, offset, in_features, spec, dtype):  # type: ignore[no-untyped-def]
        return select_path(packed.device).dequantize(packed, scale, offset, in_features, spec, dtype)

    def linear(self, x, packed, scale, offset, bias, in_features, spec, fused_max_tokens):  # type: ignore[no-untyped-def]
        path = select_path(packed.device) if x.device == packed.device else TORCH
        return path.linear(x, packed, scale, offset, bias, in_features, spec, fused_max_tokens)


TORCH: ComputePath = ComputePath()
CPU_KERNELS: ComputePath = _CpuKernelPath()
TRITON: ComputePath = _TritonPath()
AUTO: ComputePath = _AutoPath()


def select_path(device: torch.device | str) -> ComputePath:
    """The fastest path for tensors on ``device`` with the kernels' switches as they are now.

    ``meta`` gives :data:`AUTO` (the tensors' device is not known yet). Reads
    ``OPTIMUM_SPLITQUANT_KERNELS`` / ``OPTIMUM_SPLITQUANT_TRITON`` (and builds the CPU kernels on first use).
    """
    kind = torch.device(device).type
    if kind == "meta":
        return AUTO
    if kind == "cuda" and triton_ops.available():
        return TRITON
    if kind == "cpu" and kernels.available():
        return CPU_KERNELS
    return TORCH


def dequantize_compact(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    in_features: int,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
    *,
    column_scale: torch.Tensor | None = None,
    path: ComputePath | None = None,
) -> torch.Tensor:
    """The ``(rows, in_features)`` float weight of compact tensors (a new tensor), times ``column_scale``.

    ``path`` defaults to :data:`AUTO` (the fastest path of the tensors' device). Every path gives the same bits.
    """
    path = path or AUTO
    if column_scale is None:
        return path.dequantize(packed, scale, offset, in_features, spec, dtype)
    w = path.dequantize(packed, scale, offset, in_features, spec, torch.float32)
    return w.mul_(column_scale.to(device=w.device, dtype=torch.float32)).to(dtype)


def linear_compact(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    spec: QuantSpec,
    *,
    column_scale: torch.Tensor | None = None,
    fused_max_tokens: int = 1,
    path: ComputePath | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for the weight in compact tensors (times ``column_scale``), in ``x``'s dtype.

    ``fused_max_tokens``: fp32 calls of at most this many tokens use the fused CPU kernel (``"cpu-kernels"``
    path). ``path`` defaults to :data:`AUTO`.
    """
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    path = path or AUTO
    if column_scale is not None:
        if x.dtype != torch.float32:
            w = dequantize_compact(
                packed, scale, offset, in_features, spec, x.dtype, column_scale=column_scale, path=path
            )
            return F.linear(x, w, bias)
        x = x * column_scale.to(device=x.device, dtype=x.dtype)
    return path.linear(x, packed, scale, offset, bias, in_features, spec, fused_max_tokens)
