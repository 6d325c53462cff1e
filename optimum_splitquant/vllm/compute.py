"""The vLLM layer's arithmetic, without vLLM: the forward pass.

:func:`linear` is :func:`optimum_splitquant.nn.linear_compact`, the same stateless path the
transformers layers run (:mod:`optimum_splitquant.nn.compute`: the Triton ops for CUDA tensors, the
fused CPU kernel for fp32 calls of at most :data:`FUSED_MAX_TOKENS` tokens, otherwise dequantize and
one ``F.linear`` in the input dtype), with a larger fused-kernel threshold: a vLLM decode step batches
several sequences.
"""

from __future__ import annotations

import torch

from ..core.spec import QuantSpec
from ..nn.compute import linear_compact

__all__ = ["FUSED_MAX_TOKENS", "linear"]

FUSED_MAX_TOKENS = 32
"""Calls with at most this many fp32 tokens use the fused CPU kernel: it beats dequantize + GEMM for a
few dozen tokens on CPU (:mod:`optimum_splitquant.nn.linear`), which covers a decode step of a batch of
up to 32 sequences; a prefill of more tokens dequantizes once and runs one GEMM."""


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    spec: QuantSpec,
    fused_max_tokens: int = FUSED_MAX_TOKENS,
    *,
    column_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for the weight stored in ``packed`` / ``scale`` / ``offset`` (see the module docstring),
    its columns times ``column_scale`` when given (format 4)."""
    return linear_compact(
        x,
        packed,
        scale,
        offset,
        bias,
        in_features,
        spec,
        column_scale=column_scale,
        fused_max_tokens=fused_max_tokens,
    )
