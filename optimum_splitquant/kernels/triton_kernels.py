"""Triton programs behind :mod:`.triton_ops` (imported only when ``triton`` is installed).

Both programs read the compact format directly: symbol ``c`` of a row starts at bit ``c * WIDTH``
of the row's little-endian bitstream (:mod:`optimum_splitquant.core.packing`), so each lane loads
the two (three for ``WIDTH > 9``) bytes that can hold its symbol, shifts and masks; then
``id = symbol >> BITS``, ``code = symbol & (2**BITS - 1)`` and ``w = offset + code * scale`` in
fp32 with the range of ``(row, column // group_size, id)``, as :func:`core.dequantize_weight`.
Any symbol width from 1 to 16 works with the same code.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dequantize_kernel", "linear_kernel"]


@triton.jit
def _weights(
    packed_ptr,
    scale_ptr,
    offset_ptr,
    rows,
    cols,
    n_rows,
    in_features,
    row_bytes,
    group_size,
    groups,
    BITS: tl.constexpr,
    WIDTH: tl.constexpr,
    K: tl.constexpr,
):
    """fp32 weights at ``rows`` x ``cols`` (broadcast index blocks); 0 outside the matrix."""
    inside = (rows < n_rows) & (cols < in_features)
    bit = cols * WIDTH
    byte = bit >> 3
    base = packed_ptr + rows.to(tl.int64) * row_bytes + byte
    word = tl.load(base, mask=inside, other=0).to(tl.int32)
    if WIDTH > 1:
        word |= tl.load(base + 1, mask=inside & (byte + 1 < row_bytes), other=0).to(tl.int32) << 8
    if WIDTH > 9:
        word |= tl.load(base + 2, mask=inside & (byte + 2 < row_bytes), other=0).to(tl.int32) << 16
    sym = (word >> (bit & 7)) & ((1 << WIDTH) - 1)
    cid = tl.minimum(sym >> BITS, K - 1)  # ids past the last cluster only occur in damaged data
    code = (sym & ((1 << BITS) - 1)).to(tl.float32)
    slot = (rows.to(tl.int64) * groups + cols // group_size) * K + cid
    scale = tl.load(scale_ptr + slot, mask=inside, other=0).to(tl.float32)
    offset = tl.load(offset_ptr + slot, mask=inside, other=0).to(tl.float32)
    return offset + code * scale


@triton.jit
def _to_dtype_of(v, out_ptr):
    """``v`` (fp32) rounded to nearest-even in ``out_ptr``'s dtype.

    bf16 rounds by integer arithmetic on the bits (finite values), so triton's interpreter, whose
    fp32 -> bf16 cast truncates, gives the same bits as the GPU and as torch.
    """
    if out_ptr.dtype.element_ty == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        out = b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(out_ptr.dtype.element_ty)
    return out


@triton.jit
def dequantize_kernel(
    packed_ptr,
    scale_ptr,
    offset_ptr,
    out_ptr,
    n_rows,
    in_features,
    row_bytes,
    group_size,
    groups,
    BITS: tl.constexpr,
    WIDTH: tl.constexpr,
    K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One ``BLOCK_R x BLOCK_C`` tile of the ``(n_rows, in_features)`` weight, in ``out_ptr``'s dtype."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    w = _weights(
        packed_ptr,
        scale_ptr,
        offset_ptr,
        rows,
        cols,
        n_rows,
        in_features,
        row_bytes,
        group_size,
        groups,
        BITS,
        WIDTH,
        K,
    )
    inside = (rows < n_rows) & (cols < in_features)
    tl.store(out_ptr + rows.to(tl.int64) * in_features + cols, _to_dtype_of(w, out_ptr), mask=inside)


@triton.jit
def linear_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    offset_ptr,
    bias_ptr,
    out_ptr,
    tokens,
    n_rows,
    in_features,
    row_bytes,
    group_size,
    groups,
    HAS_BIAS: tl.constexpr,
    BITS: tl.constexpr,
    WIDTH: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[:, rows] = x @ W[rows].T (+ bias)`` for all ``tokens`` (<= BLOCK_M) rows of ``x``; fp32 sums.

    Each program owns ``BLOCK_N`` output features and walks the whole input width, so every packed
    byte, scale and offset is read by one program only, and no float weight is written.
    """
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.arange(0, BLOCK_M)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)[None, :]
        w = _weights(
            packed_ptr,
            scale_ptr,
            offset_ptr,
            r[:, None],
            cols,
            n_rows,
            in_features,
            row_bytes,
            group_size,
            groups,
            BITS,
            WIDTH,
            K,
        )
        xk = tl.load(x_ptr + t * in_features + cols, mask=(t < tokens) & (cols < in_features), other=0)
        acc += tl.sum(xk.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + r, mask=r < n_rows, other=0).to(tl.float32)[None, :]
    tl.store(out_ptr + t * n_rows + r[None, :], _to_dtype_of(acc, out_ptr), mask=(t < tokens) & (r < n_rows)[None, :])
