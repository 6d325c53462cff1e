"""Coded ranges: each (row, group, cluster) scale and offset stored as a ``range_bits``-bit code.

With ``QuantSpec.range_bits`` set, the ranges of a weight are not stored one float each. Take the
``(row, group)`` lines of the weight in row-major order and cut them into blocks of
``range_block`` consecutive lines (a block may cross rows; the last may be short). For every
(block, cluster) two steps are stored in ``scale_dtype``: ``scale_step >= 0`` and a signed
``offset_step``. Each (line, cluster) stores two unsigned codes in ``[0, 2**range_bits - 1]``::

    scale = (scale_code * scale_step).to(scale_dtype)(products in float32)
    offset = (offset_code * offset_step).to(scale_dtype)

An offset whose sign differs from its block's ``offset_step`` (rare: a block's ranges of one
cluster mostly start on the same side of zero) is stored as 0. The scale step is the block's
largest scale over ``2**range_bits - 1`` and the offset step its largest-magnitude offset over the
same; both are rounded away from zero so every code fits. This is the super-block scheme of
llama.cpp's k-quants, applied per cluster: about ``2 * range_bits`` bits of side data per
(line, cluster) instead of 32 (two fp16 values).

Stored (see :mod:`optimum_splitquant.checkpoint.format`): ``range_codes``, the ``2 * lines * k``
codes packed as one :mod:`~optimum_splitquant.core.packing` row (all scale codes in
``(row, group, cluster)`` order, then all offset codes), and ``range_steps`` of shape
``(blocks, 2, k)`` (``[:, 0]`` scale steps, ``[:, 1]`` offset steps).
"""

from __future__ import annotations

import torch

from .packing import pack_rows, packed_row_bytes, unpack_rows
from .spec import QuantSpec

__all__ = [
    "CodedRanges",
    "decode_ranges",
    "encode_ranges",
    "pack_range_codes",
    "range_codes_bytes",
    "unpack_range_codes",
]


class CodedRanges:
    """Integer codes ``(lines, k)`` of the scales and offsets, and their steps ``(blocks, 2, k)``."""

    __slots__ = ("offset_codes", "scale_codes", "steps")

    def __init__(self, scale_codes: torch.Tensor, offset_codes: torch.Tensor, steps: torch.Tensor) -> None:
        self.scale_codes = scale_codes
        self.offset_codes = offset_codes
        self.steps = steps


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(lines, k)`` padded with zeros to whole blocks, as ``(blocks, block, k)``."""
    lines, k = x.shape
    pad = -lines % block
    if pad:
        x = torch.cat([x, x.new_zeros(pad, k)])
    return x.view(-1, block, k)


def _step_covering(value: torch.Tensor, top: int, dtype: torch.dtype) -> torch.Tensor:
    """``value / top`` in ``dtype``, rounded away from zero so ``top * step`` reaches ``value``."""
    exact = value / top
    step = exact.to(dtype)
    short = step.float().abs() < exact.abs()
    away = torch.where(exact < 0, -torch.inf, torch.inf)
    return torch.where(short, torch.nextafter(step, away.to(dtype)), step)


def encode_ranges(scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec) -> CodedRanges:
    """Codes and steps of float ranges ``scale`` / ``offset`` ``(lines, k)`` (lines in row-major order).

    ``scale`` must be non-negative. Raises ``ValueError`` if a step overflows ``spec.scale_dtype``.
    """
    if spec.range_bits is None:
        raise ValueError("encode_ranges needs a spec with range_bits set")
    lines, k = scale.shape
    top = (1 << spec.range_bits) - 1
    s = _blocks(scale.float(), spec.range_block)
    o = _blocks(offset.float(), spec.range_block)
    scale_step = _step_covering(s.amax(1), top, spec.scale_dtype)  # (blocks, k)
    pick = o.abs().argmax(1, keepdim=True)
    offset_step = _step_covering(o.gather(1, pick).squeeze(1), top, spec.scale_dtype)
    steps = torch.stack([scale_step, offset_step], 1)
    if not bool(torch.isfinite(steps).all()):
        raise ValueError(
            f"the fitted ranges do not fit scale_dtype {spec.scale_dtype} as coded steps; use scale_dtype='float32'"
        )
    ss, os_ = scale_step.float().unsqueeze(1), offset_step.float().unsqueeze(1)
    sc = torch.where(ss > 0, s / torch.where(ss > 0, ss, 1.0), 0.0).round_().clamp_(0, top)
    sc = torch.where((s > 0) & (sc == 0), 1.0, sc)  # a non-empty range keeps a step
    oc = torch.where(os_ != 0, o / torch.where(os_ != 0, os_, 1.0), 0.0).round_().clamp_(0, top)
    as_lines = lambda c: c.reshape(-1, k)[:lines].to(torch.uint8)  # noqa: E731
    return CodedRanges(as_lines(sc), as_lines(oc), steps)


def decode_ranges(coded: CodedRanges, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` ``(lines, k)`` in ``spec.scale_dtype`` from their codes and steps."""
    lines, k = coded.scale_codes.shape
    steps = coded.steps.float().unsqueeze(2)  # (blocks, 2, 1, k): one step pair per block of lines
    blocks = steps.shape[0]

    def decoded(codes: torch.Tensor, which: int) -> torch.Tensor:
        c = _blocks(codes.float(), spec.range_block) if blocks * spec.range_block != lines else codes.float()
        return (c.view(blocks, -1, k) * steps[:, which]).view(-1, k)[:lines].to(spec.scale_dtype)

    return decoded(coded.scale_codes, 0), decoded(coded.offset_codes, 1)


def range_codes_bytes(lines: int, k: int, range_bits: int) -> int:
    """Bytes of the packed codes of ``lines`` lines of ``k`` clusters."""
    return packed_row_bytes(2 * lines * k, range_bits)


def pack_range_codes(coded: CodedRanges, spec: QuantSpec) -> torch.Tensor:
    """The 1-D ``uint8`` stream of all scale codes, then all offset codes."""
    symbols = torch.cat([coded.scale_codes.reshape(-1), coded.offset_codes.reshape(-1)]).to(torch.int32)
    return pack_rows(symbols.unsqueeze(0), spec.range_bits).reshape(-1)


def unpack_range_codes(packed: torch.Tensor, steps: torch.Tensor, lines: int, spec: QuantSpec) -> CodedRanges:
    """Inverse of :func:`pack_range_codes` for ``lines`` lines (the steps are passed through)."""
    k = spec.num_clusters
    symbols = unpack_rows(packed.reshape(1, -1), spec.range_bits, 2 * lines * k).reshape(2, lines, k)
    return CodedRanges(symbols[0].to(torch.uint8), symbols[1].to(torch.uint8), steps)
