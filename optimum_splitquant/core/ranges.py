"""Coded ranges: each (row, group, cluster) scale and offset stored as a ``range_bits``-bit code.

With ``QuantSpec.range_bits`` set, the ranges of a weight are not stored one float each. Take the
``(row, group)`` lines of the weight in row-major order and cut them into blocks of
``range_block`` consecutive lines (a block may cross rows; the last may be short, and a block
longer than the weight's lines is one block of all of them). For every (block, cluster) two steps
are stored in ``scale_dtype``. Each (line, cluster) stores two unsigned codes in
``[0, top]``, ``top = 2**range_bits - 1`` (products in float32, rounded to ``scale_dtype``)::

    scale  = (scale_code * scale_step).to(scale_dtype)                    scale_step >= 0
    offset = ((offset_code - zero) * offset_step).to(scale_dtype)

Format 3 (``spec.signed_offsets``): ``zero = 2**(range_bits - 1)`` and ``offset_step >= 0``, so
offsets of either sign share a block (a row of positive weights beside rows of negative minima, a
constant row). Format 2 (read for old checkpoints, written only when asked for): ``zero = 0`` and a
signed ``offset_step``; an offset of the other sign than its block's step is stored as 0.

The scale step is the block's largest scale over ``top`` and the offset step its largest offset
magnitude over the codes on that side of ``zero``; both are rounded away from zero so every code
fits. Codes are the nearest ones; :func:`code_variants` gives the codes one step down or up, from
which the fit keeps, per line, the one that reconstructs the weights best. This is the super-block
scheme of llama.cpp's k-quants, applied per cluster: about ``2 * range_bits`` bits of side data per
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
    "code_variants",
    "decode_layer_ranges",
    "decode_ranges",
    "encode_ranges",
    "offset_zero",
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
    """``(lines, k)`` padded with zeros to whole blocks, as ``(blocks, block, k)``.

    A block longer than the lines is one block of all of them (nothing padded).
    """
    lines, k = x.shape
    block = min(block, max(lines, 1))
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


def offset_zero(spec: QuantSpec) -> int:
    """The offset code that stands for 0: ``2**(range_bits - 1)`` in format 3, 0 in format 2."""
    return 1 << (spec.range_bits - 1) if spec.signed_offsets else 0


def encode_ranges(scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec) -> CodedRanges:
    """Nearest codes and steps of float ranges ``scale`` / ``offset`` ``(lines, k)`` (lines in row-major order).

    ``scale`` must be non-negative. Raises ``ValueError`` if a step overflows ``spec.scale_dtype``.
    """
    if spec.range_bits is None:
        raise ValueError("encode_ranges needs a spec with range_bits set")
    lines = scale.shape[0]
    top = (1 << spec.range_bits) - 1
    zero = offset_zero(spec)
    s = _blocks(scale.float(), spec.range_block)
    o = _blocks(offset.float(), spec.range_block)
    scale_step = _step_covering(s.amax(1), top, spec.scale_dtype)  # (blocks, k)
    if spec.signed_offsets:  # the largest magnitude on either side of the zero code
        reach = torch.maximum(o.amax(1).clamp(min=0) / (top - zero), (-o.amin(1)).clamp(min=0) / zero)
        offset_step = _step_covering(reach, 1, spec.scale_dtype)
    else:
        pick = o.abs().argmax(1, keepdim=True)
        offset_step = _step_covering(o.gather(1, pick).squeeze(1), top, spec.scale_dtype)
    steps = torch.stack([scale_step, offset_step], 1)
    if not bool(torch.isfinite(steps).all()):
        raise ValueError(
            f"the fitted ranges do not fit scale_dtype {spec.scale_dtype} as coded steps; {spec.overflow_advice()}"
        )
    sc, oc = _ratios(s, o, steps)
    sc = sc.round().clamp_(0, top)
    sc = torch.where((s > 0) & (sc == 0), 1.0, sc)  # a non-empty range keeps a step
    oc = (oc.round() + zero).clamp_(0, top)
    return CodedRanges(_as_lines(sc, lines), _as_lines(oc, lines), steps)


def _ratios(s: torch.Tensor, o: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked scales and offsets ``(blocks, block, k)`` in units of their steps (0 where a step is 0)."""
    ss, os_ = steps[:, 0].float().unsqueeze(1), steps[:, 1].float().unsqueeze(1)
    return (
        torch.where(ss > 0, s / torch.where(ss > 0, ss, 1.0), 0.0),
        torch.where(os_ != 0, o / torch.where(os_ != 0, os_, 1.0), 0.0),
    )


def _as_lines(codes: torch.Tensor, lines: int) -> torch.Tensor:
    return codes.reshape(-1, codes.shape[-1])[:lines].to(torch.uint8)


def code_variants(coded: CodedRanges, spec: QuantSpec) -> list[CodedRanges]:
    """Format 3 ``coded`` with each line's codes one step away: six variants sharing the steps.

    The offset codes one step down or up, the scale codes one step up or down, and the grid
    widened (offset down, scale up) or narrowed (offset up, scale down) at both ends. Codes stay in
    ``[0, top]`` and a non-zero scale code stays non-zero.
    """
    if not spec.signed_offsets:
        raise ValueError("code_variants needs format 3 coded ranges (signed_offsets=True)")
    top = (1 << spec.range_bits) - 1
    offset, scale = coded.offset_codes.to(torch.int16), coded.scale_codes.to(torch.int16)
    down, up = (offset - 1).clamp_(min=0).to(torch.uint8), (offset + 1).clamp_(max=top).to(torch.uint8)
    wider = (scale + 1).clamp_(max=top).where(scale > 0, 0).to(torch.uint8)
    narrower = (scale - 1).clamp_(min=1).where(scale > 0, 0).to(torch.uint8)
    pairs = ((coded.scale_codes, down), (coded.scale_codes, up), (wider, coded.offset_codes))
    pairs += ((narrower, coded.offset_codes), (wider, down), (narrower, up))
    return [CodedRanges(s, o, coded.steps) for s, o in pairs]


def decode_ranges(coded: CodedRanges, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` ``(lines, k)`` in ``spec.scale_dtype`` from their codes and steps."""
    lines, k = coded.scale_codes.shape
    steps = coded.steps.float().unsqueeze(2)  # (blocks, 2, 1, k): one step pair per block of lines
    blocks = steps.shape[0]
    zero = offset_zero(spec)

    def decoded(codes: torch.Tensor, which: int, zero: int) -> torch.Tensor:
        c = codes.float() - zero if zero else codes.float()
        c = _blocks(c, spec.range_block) if blocks * spec.range_block != lines else c
        return (c.view(blocks, -1, k) * steps[:, which]).view(-1, k)[:lines].to(spec.scale_dtype)

    return decoded(coded.scale_codes, 0, 0), decoded(coded.offset_codes, 1, zero)


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


def decode_layer_ranges(
    codes: torch.Tensor,
    steps: torch.Tensor,
    rows: int,
    groups: int,
    spec: QuantSpec,
    *,
    compiled: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` ``(rows, groups, num_clusters)`` of one layer's stored range codes and steps.

    Decoded as stored (products rounded to ``spec.scale_dtype``), then held in the steps' dtype where a
    model was cast: the same values a cast of float ranges gives (an fp32 cast changes nothing).
    ``compiled`` picks the compiled CPU op ``decode_ranges`` (:mod:`optimum_splitquant.kernels`: one pass,
    the same bits) or the pure-torch unpack and decode; ``None`` decides now (CPU tensors and
    :func:`optimum_splitquant.kernels.available`). A layer passes the choice it made once.
    """
    lines = rows * groups
    if compiled is None:
        from .. import kernels  # optional compiled ops (a leaf: torch only)

        compiled = codes.device.type == "cpu" and steps.device.type == "cpu" and kernels.available()
    if compiled:
        from .. import kernels

        decoded = kernels.decode_ranges(
            codes, steps, lines, spec.range_bits, spec.range_block, spec.signed_offsets, spec.scale_dtype
        )
    else:
        decoded = decode_ranges(unpack_range_codes(codes, steps, lines, spec), spec)
    shape = (rows, groups, spec.num_clusters)
    return tuple(t.to(steps.dtype).view(shape) for t in decoded)  # type: ignore[return-value]
