"""Sub-byte packing of unsigned integer symbols into ``uint8`` rows.

Layout (format version 1)
-------------------------
Each row of ``n`` symbols, each ``width`` bits wide (1 <= width <= 16), is padded with zero
symbols to a multiple of 8 and written as one little-endian bitstream: symbol ``i`` of the row
occupies bits ``[i * width, (i + 1) * width)`` of the stream, least significant bit first, and bit
``j`` of the stream is bit ``j % 8`` of byte ``j // 8``. Eight symbols therefore fill exactly
``width`` bytes and a row packs into ``ceil(n / 8) * width`` bytes. Rows never share a byte.

For ``width = 4`` byte ``t`` holds symbol ``2t`` in its low nibble and ``2t + 1`` in its high
nibble::

    byte t:  bit 7 6 5 4 | 3 2 1 0
             sym 2t+1    | sym 2t

For ``width = 2`` four symbols share a byte (symbol ``4t + r`` in bits ``2r, 2r + 1``), for
``width = 8`` each byte is one symbol, and for ``width = 5`` eight symbols fill five bytes.
Widths 1, 2, 4 and 8 have shift-and-mask fast paths that produce the same bytes as the generic
bit-plane path. On little-endian hosts, unpacking widths below 8 reads each run of eight symbols
(``width`` bytes) as one 64-bit word and shifts the symbols out of it (tested against the
bit-plane path).
"""

from __future__ import annotations

import sys

import torch

__all__ = ["pack_rows", "packed_row_bytes", "unpack_rows"]

_FAST_WIDTHS = (1, 2, 4, 8)


def packed_row_bytes(n: int, width: int) -> int:
    """Bytes one row of ``n`` symbols of ``width`` bits occupies."""
    _check_width(width)
    return -(-n // 8) * width


def pack_rows(symbols: torch.Tensor, width: int) -> torch.Tensor:
    """Pack a 2-D tensor of non-negative integers ``< 2**width`` into ``uint8`` rows."""
    _check_width(width)
    if symbols.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor, got shape {tuple(symbols.shape)}")
    if symbols.is_floating_point() or symbols.is_complex():
        raise TypeError(f"pack_rows expects an integer tensor, got {symbols.dtype}")
    rows, n = symbols.shape
    # Range check before the int32 cast, which would wrap int64 values >= 2**31 into range.
    if symbols.numel() and not _in_range(symbols, width):
        raise ValueError(f"symbols must lie in [0, {(1 << width) - 1}] for width {width}")
    sym = symbols.to(torch.int32)
    padded = -(-n // 8) * 8
    if padded != n:
        sym = torch.nn.functional.pad(sym, (0, padded - n))
    if width in _FAST_WIDTHS:  # the symbols of a byte ORed in one at a time (disjoint fields)
        per_byte = 8 // width
        parts = sym.view(rows, padded // per_byte, per_byte)
        packed = parts[..., 0].to(torch.uint8, memory_format=torch.contiguous_format)
        for s in range(1, per_byte):
            packed.bitwise_or_(parts[..., s].to(torch.uint8) << s * width)
        return packed
    if width < 8 and sys.byteorder == "little":
        return _pack_words(sym, width)
    groups = sym.view(rows, padded // 8, 8, 1)
    bit_index = torch.arange(width, dtype=torch.int32, device=sym.device)
    bits = (groups >> bit_index) & 1  # (rows, groups, 8 symbols, width bits)
    bits = bits.reshape(rows, padded // 8, width, 8)  # same stream, cut into bytes
    weights = torch.arange(8, dtype=torch.int32, device=sym.device)
    packed = (bits << weights).sum(-1, dtype=torch.int32)
    return packed.to(torch.uint8).reshape(rows, (padded // 8) * width)


def unpack_rows(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``uint8`` rows back to ``int64`` symbols of shape ``(rows, n)``."""
    _check_width(width)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_rows expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, width):
        raise ValueError(
            f"a row of {n} symbols of {width} bits packs into {packed_row_bytes(n, width)} bytes, got {nbytes}"
        )
    if width < 8 and sys.byteorder == "little":
        return _unpack_words(packed, width, n)
    if width in _FAST_WIDTHS:
        per_byte = 8 // width
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * width
        mask = (1 << width) - 1
        sym = (packed.unsqueeze(-1) >> shifts) & mask
        return sym.reshape(rows, nbytes * per_byte)[:, :n].long()
    groups = packed.view(rows, nbytes // width, width, 1).to(torch.int32)
    bits = (groups >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1
    bits = bits.reshape(rows, nbytes // width, 8, width)
    sym = (bits << torch.arange(width, dtype=torch.int32, device=packed.device)).sum(-1)
    return sym.reshape(rows, (nbytes // width) * 8)[:, :n].long()  # explicit size: rows may be 0


def _pack_words(sym: torch.Tensor, width: int) -> torch.Tensor:
    """Widths below 8: each run of eight symbols becomes one int64 word (symbol ``s`` at bits
    ``[s * width, (s + 1) * width)``), whose low ``width`` bytes are the run's packed bytes."""
    rows, padded = sym.shape
    runs = padded // 8
    parts = sym.view(rows, runs, 8)
    words = parts[..., 0].to(torch.int64, memory_format=torch.contiguous_format)
    for s in range(1, 8):  # disjoint fields, ORed in one symbol of each run at a time
        words.bitwise_or_(parts[..., s].to(torch.int64) << s * width)
    return words.view(torch.uint8).view(rows, runs, 8)[:, :, :width].reshape(rows, runs * width)


def _unpack_words(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Widths below 8: each run of eight symbols fills ``width`` bytes, read as one int64 word."""
    rows, nbytes = packed.shape
    runs = nbytes // width
    words = torch.zeros(rows, runs, 8, dtype=torch.uint8, device=packed.device)
    words[..., :width] = packed.view(rows, runs, width)
    word = words.view(torch.int64)  # (rows, runs, 1); the top byte stays 0, so no sign bits
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * width
    sym = (word >> shifts) & ((1 << width) - 1)
    return sym.reshape(rows, runs * 8)[:, :n].contiguous()


def _in_range(symbols: torch.Tensor, width: int) -> bool:
    """Whether every symbol lies in ``[0, 2**width)`` (read before any cast, which could wrap them)."""
    lo, hi = torch.aminmax(symbols)
    return int(lo) >= 0 and int(hi) < 1 << width


def _check_width(width: int) -> None:
    if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 16:
        raise ValueError(f"symbol width must be an integer in [1, 16], got {width!r}")
