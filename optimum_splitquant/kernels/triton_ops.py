"""Optional fused Triton kernels for CUDA tensors, with the pure-torch path as fallback.

Torch custom ops (``torch.library.custom_op``, with fake implementations so ``torch.compile``
traces through them); the programs live in :mod:`.triton_kernels`, imported on first use:

* ``torch.ops.optimum_splitquant_triton.dequantize``: packed rows -> ``(out, in_features)`` weight
  in fp16, bf16 or fp32; every symbol width, grouped or per-row ranges, any ``in_features``. The
  same fp32 arithmetic as :func:`optimum_splitquant.core.dequantize_weight` (``offset + code *
  scale``, then one cast), without fused multiply-adds, so the same bits.
* ``torch.ops.optimum_splitquant_triton.linear``: ``x @ W.T + bias`` for ``x`` of at most
  :data:`MAX_TOKENS` rows (the decode step), reading the packed bytes once and summing in fp32;
  the same weights as the plain path, summed in another order. Every symbol width.

:func:`forward` picks one of them for a layer: the fused op for few tokens when no gradient is
wanted, otherwise dequantize (in the input dtype) and one ``F.linear``.

``OPTIMUM_SPLITQUANT_TRITON`` selects the behaviour, as ``OPTIMUM_SPLITQUANT_KERNELS`` does for the
CPU kernels: ``auto`` (default: used for CUDA tensors when ``triton`` imports), ``off``
(``0``/``false``/``torch``: pure torch only) or ``require`` (``1``/``on``: raise if triton cannot be
used). The two switches are independent. Like the rest of :mod:`optimum_splitquant.kernels`, this
module depends on torch alone (``triton`` is imported lazily).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F

from . import switch_mode

__all__ = ["ENV_VAR", "MAX_TOKENS", "available", "dequantize", "forward", "linear", "mode", "unavailable_reason"]

logger = logging.getLogger(__name__)

ENV_VAR = "OPTIMUM_SPLITQUANT_TRITON"

MAX_TOKENS = 8
"""Calls with at most this many input rows use the fused op; larger ones dequantize, then one GEMM."""


def mode() -> str:
    """The mode requested by ``OPTIMUM_SPLITQUANT_TRITON`` (read on every call)."""
    return switch_mode(ENV_VAR)


@functools.cache
def unavailable_reason() -> str:
    """Why the Triton kernels cannot run here ("" when they can); imports triton once per process."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError as exc:
        logger.info("SplitQuant: triton is not importable, CUDA layers use the pure-torch path: %s", exc)
        return f"triton is not importable ({exc}); install the 'gpu' extra"
    return ""


@torch.compiler.assume_constant_result
def available() -> bool:
    """True when CUDA layers should use the Triton kernels (a traced constant under ``torch.compile``)."""
    m = mode()
    if m == "off":
        return False
    reason = unavailable_reason()
    if reason and m == "require":
        raise RuntimeError(f"{ENV_VAR}=require but the SplitQuant Triton kernels cannot be used: {reason}")
    return not reason


def _layout(packed: torch.Tensor, scale: torch.Tensor, in_features: int, width: int) -> tuple[int, int, int]:
    """(row bytes, group size, groups) of a compact weight, checked against ``in_features``."""
    groups = scale.shape[1]
    row_bytes = -(-in_features // 8) * width
    if packed.shape[1] != row_bytes:
        raise ValueError(
            f"a row of {in_features} symbols of {width} bits packs into {row_bytes} bytes, got {packed.shape[1]}"
        )
    if groups < 1 or in_features % groups:
        raise ValueError(f"{groups} range groups do not divide the input width {in_features}")
    return row_bytes, in_features // groups, groups


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device`` (triton launches on the current CUDA device), e.g. with ``device_map`` over GPUs."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("optimum_splitquant_triton::dequantize", mutates_args=())
def _dequantize_op(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    in_features: int,
    bits: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    from .triton_kernels import dequantize_kernel

    rows = packed.shape[0]
    out = torch.empty(rows, in_features, dtype=dtype, device=packed.device)
    if out.numel() == 0:
        return out
    row_bytes, group_size, groups = _layout(packed, scale, in_features, width)
    block_r, block_c = 16, 128
    grid = (-(-rows // block_r), -(-in_features // block_c))
    extra = {} if packed.device.type == "cpu" else {"enable_fp_fusion": False}  # no FMA: the reference's rounding
    with _on(packed.device):
        dequantize_kernel[grid](
            packed.contiguous(),
            scale.contiguous(),
            offset.contiguous(),
            out,
            rows,
            in_features,
            row_bytes,
            group_size,
            groups,
            BITS=bits,
            WIDTH=width,
            K=scale.shape[2],
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            **extra,
        )
    return out


@_dequantize_op.register_fake
def _dequantize_fake(packed, scale, offset, in_features, bits, width, dtype):  # type: ignore[no-untyped-def]
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)


@torch.library.custom_op("optimum_splitquant_triton::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    bits: int,
    width: int,
) -> torch.Tensor:
    from .triton_kernels import linear_kernel

    tokens, rows = x.shape[0], packed.shape[0]
    if tokens > MAX_TOKENS:
        raise ValueError(f"the fused Triton linear takes at most {MAX_TOKENS} rows of x, got {tokens}")
    out = torch.empty(tokens, rows, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if in_features == 0:
        return out.zero_() if bias is None else out.copy_(bias.to(x.dtype).expand_as(out))
    row_bytes, group_size, groups = _layout(packed, scale, in_features, width)
    extra = {} if x.device.type == "cpu" else {"enable_fp_fusion": True}  # the interpreter takes none
    block_m = _next_power_of_2(tokens)
    block_n, block_k = 16, max(32, 256 // block_m)  # untuned: keeps the fp32 product tile at 4096 values
    with _on(x.device):
        linear_kernel[(-(-rows // block_n),)](
            x.contiguous(),
            packed.contiguous(),
            scale.contiguous(),
            offset.contiguous(),
            bias.contiguous() if bias is not None else out,  # never read without HAS_BIAS
            out,
            tokens,
            rows,
            in_features,
            row_bytes,
            group_size,
            groups,
            HAS_BIAS=bias is not None,
            BITS=bits,
            WIDTH=width,
            K=scale.shape[2],
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            **extra,
        )
    return out


@_linear_op.register_fake
def _linear_fake(x, packed, scale, offset, bias, in_features, bits, width):  # type: ignore[no-untyped-def]
    return x.new_empty((x.shape[0], packed.shape[0]))


def _next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (at least 1)."""
    return 1 << max(0, n - 1).bit_length()


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    in_features: int,
    bits: int,
    width: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(out, in_features)`` weight in ``dtype``, bit-identical to ``core.dequantize_weight``."""
    return torch.ops.optimum_splitquant_triton.dequantize.default(
        packed, scale, offset, in_features, bits, width, dtype
    )


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    bits: int,
    width: int,
) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``(tokens <= MAX_TOKENS, in_features)``, in ``x``'s dtype."""
    return torch.ops.optimum_splitquant_triton.linear.default(x, packed, scale, offset, bias, in_features, bits, width)


def forward(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    bits: int,
    width: int,
) -> torch.Tensor:
    """A linear layer's output for ``x`` of shape ``(..., in_features)``: fused op or dequantize + GEMM.

    ``bias`` must already be in ``x``'s dtype. The fused op serves at most :data:`MAX_TOKENS` rows
    when no gradient is wanted (it has no backward); gradients flow through ``F.linear`` otherwise.
    """
    rows = x.numel() // max(in_features, 1)
    if 0 < rows <= MAX_TOKENS and not (x.requires_grad and torch.is_grad_enabled()):
        y = linear(x.reshape(-1, in_features), packed, scale, offset, bias, in_features, bits, width)
        return y.view(*x.shape[:-1], packed.shape[0])
    return F.linear(x, dequantize(packed, scale, offset, in_features, bits, width, x.dtype), bias)
