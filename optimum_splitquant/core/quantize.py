"""Split quantization of one weight matrix into the compact representation, and back.

A weight ``W`` of shape ``(out, in)`` is clustered by 1-D k-means (over the whole tensor, or per
output row), every weight gets a cluster id, and inside each (row, range group, cluster) the
member weights are quantized with their own asymmetric min-max range to ``bits``-bit codes::

    symbol  = cluster_id << bits | code                      (packed by core.packing)
    W_hat   = offset[row, group, id] + code * scale[row, group, id]

``W_hat`` equals the sum of the ``k`` separately quantized branches of the paper (each branch
holds its cluster's values and exact zeros elsewhere), in one tensor and one matmul.

With ``spec.column_scales`` (and at least :data:`~.spec.COLUMN_SCALE_MIN_ROWS` rows), every input
column ``j`` is first divided by its own scale ``c[j]`` (:func:`column_scales`) and the quotient is
quantized as above: ``W_hat = (offset + code * scale) * c``, computed as ``W_hat' (c * x)``.

With ``spec.range_bits`` set, the ranges are stored as codes times per-block steps
(:mod:`.ranges`): the fitted ranges are coded, then every weight moves to the nearest level of
the coded ranges.

Ranges are rounded outwards when stored: ``offset`` is the cluster minimum rounded down to
``scale_dtype`` and ``scale`` is rounded up, so the stored grid always covers the cluster and
every weight is within half a (stored) step of its reconstruction. A cluster with no member in a
(row, group) stores ``scale = offset = 0``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .fit import fit_best_start, fit_coded, grid_codes, stored_range, zero_ids
from .kmeans import assign_clusters, kmeans_1d
from .packing import pack_rows, packed_row_bytes, unpack_rows
from .ranges import CodedRanges, pack_range_codes
from .spec import QuantSpec

__all__ = [
    "QuantizedWeight",
    "cluster_ids",
    "column_scales",
    "decode_symbols",
    "dequantize_weight",
    "quantize_weight",
    "split_branches",
]


@dataclass(frozen=True)
class QuantizedWeight:
    """Compact tensors of one quantized ``(out, in)`` weight (see the module docstring).

    Attributes:
        packed: ``uint8`` ``(out, ceil(in / 8) * spec.symbol_width)``.
        scale: ``spec.scale_dtype`` ``(out, groups, num_clusters)``.
        offset: ``spec.scale_dtype`` ``(out, groups, num_clusters)``.
        in_features: original input width.
        range_codes: with ``spec.range_bits``, the packed codes of the ranges (``uint8``, 1-D;
            ``scale`` and ``offset`` are then their decoded values), else ``None``.
        range_steps: with ``spec.range_bits``, the steps ``(blocks, 2, num_clusters)``, else ``None``.
        column_scale: with column scales (:meth:`~.spec.QuantSpec.has_column_scales`), the scale of
            every input column (``spec.scale_dtype``, ``(in,)``), else ``None``.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    in_features: int
    range_codes: torch.Tensor | None = None
    range_steps: torch.Tensor | None = None
    column_scale: torch.Tensor | None = None


def cluster_ids(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Cluster id (int64, same shape as the 2-D ``weight``) of every weight under ``spec``."""
    w = _checked(weight)
    if w.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.int64, device=w.device)
    return assign_clusters(w, _boundaries(w, spec))


def _boundaries(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """k-means boundaries: ``(1, k - 1)`` for per-tensor clustering, ``(out, k - 1)`` per channel."""
    if spec.num_clusters == 1 or w.numel() == 0:
        return torch.zeros(1 if spec.clustering == "tensor" else w.shape[0], 0, dtype=torch.float64, device=w.device)
    if spec.clustering == "tensor":
        return kmeans_1d(w.reshape(1, -1), spec.num_clusters).boundaries
    return kmeans_1d(w, spec.num_clusters).boundaries


# Rows are quantized in chunks of about this many weights: the temporaries (ids, codes, symbols)
# of a large layer stay small while it streams in at load time. Rows are independent, so the bytes
# do not depend on the chunking.
_CHUNK_WEIGHTS = 1 << 20


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, ids: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a 2-D float ``weight`` ``(out, in)``; ``ids`` overrides the clustering when given."""
    w = _checked(weight)
    if spec.has_column_scales(w.shape[0]):
        c = column_scales(w, spec)
        if spec.bits >= COLUMN_SCALE_TRIAL_BITS and not _scales_help(w, c, spec, ids):
            c = torch.ones_like(c)
        q = _quantize_matrix(w.to(torch.float32) / c.float(), spec, ids)
        return dataclasses.replace(q, column_scale=c)
    return _quantize_matrix(w, spec, ids)


#: Column scales are kept within this factor of their median (an all-zero column gets 1).
_COLUMN_SCALE_SPAN = 2.0**10

COLUMN_SCALE_SAMPLE_ROWS = 64
"""Rows (evenly spaced) on which a layer's weight is quantized with and without its column scales to
choose; a layer of at most twice as many rows is tried whole."""

COLUMN_SCALE_TRIAL_BITS = 4
"""Codes of at least this many bits try each layer with and without its column scales (:func:`_scales_help`);
narrower codes always keep them: they cannot hold the 4-bit grids that converted checkpoints come from, and
on such weights the scales lower the model's error even where the weight's error rises a little."""


def _scales_help(w: torch.Tensor, c: torch.Tensor, spec: QuantSpec, ids: torch.Tensor | None) -> bool:
    """Whether ``w`` quantized divided by its column scales ``c`` is rebuilt with no more squared error
    than without them, measured on :data:`COLUMN_SCALE_SAMPLE_ROWS` of its rows (with ``scale_dtype``
    ranges, not coded ones: the ranges' coding changes both sides alike).

    Weights that already lie on a per-row grid the codes can hold (a model converted from a 4-bit file)
    lose that grid when their columns are rescaled; true float weights gain.
    """
    out_f, in_f = w.shape
    if out_f > 2 * COLUMN_SCALE_SAMPLE_ROWS:
        rows = torch.linspace(0, out_f - 1, COLUMN_SCALE_SAMPLE_ROWS, device=w.device).round().long()
        w, ids = w[rows], None if ids is None else ids[rows]
    w = w.to(torch.float32)
    trial = dataclasses.replace(spec, range_bits=None)
    errors = []
    for scale in (None, c.float()):
        q = _quantize_matrix(w if scale is None else w / scale, trial, ids)
        rebuilt = dequantize_weight(q.packed, q.scale, q.offset, in_f, trial, column_scale=scale)
        errors.append(float((rebuilt - w).double().square().sum()))
    return errors[1] <= errors[0]


COLUMN_SCALE_POWER = 0.7
"""Column scales are each column's relative magnitude to this power, between leaving the columns as they are
(0) and evening them out fully (1). Fully evened columns move the error onto the large columns: the demo's
SMS classifier lost 1-2 points of accuracy at 4.5 and 5.0 bits though each layer's squared error fell. At
0.7 it keeps its accuracy, all-MiniLM-L6-v2's embeddings stay as close to FP32 and SmolLM2's perplexity at
3.5 bits improves (docs/benchmarks.md, "Column scales")."""


def column_scales(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The scale of every input column of ``weight``: its root mean square over the rows, divided by
    the median of the nonzero ones, to the power :data:`COLUMN_SCALE_POWER`, kept within ``2**±10`` and
    rounded to ``spec.scale_dtype``.

    Dividing the columns by them evens out the columns' magnitudes before the row-wise ranges are fitted.
    """
    w = weight.detach()
    rms = torch.linalg.vector_norm(w, dim=0, dtype=torch.float32).div_(math.sqrt(max(w.shape[0], 1)))
    nonzero = rms > 0
    if not bool(nonzero.any()):
        return torch.ones(weight.shape[1], dtype=spec.scale_dtype, device=weight.device)
    middle = rms[nonzero].median()
    rel = torch.where(nonzero, (rms / middle).pow_(COLUMN_SCALE_POWER), 1.0)
    return rel.clamp_(1 / _COLUMN_SCALE_SPAN, _COLUMN_SCALE_SPAN).to(spec.scale_dtype)


def _quantize_matrix(w: torch.Tensor, spec: QuantSpec, ids: torch.Tensor | None) -> QuantizedWeight:
    out_f, in_f = w.shape
    k = spec.num_clusters
    groups = spec.num_groups(in_f)
    if w.numel() == 0:
        zeros = torch.zeros(out_f, groups, k, dtype=spec.scale_dtype, device=w.device)
        packed = torch.zeros(out_f, packed_row_bytes(in_f, spec.symbol_width), dtype=torch.uint8, device=w.device)
        if spec.range_bits is None:
            return QuantizedWeight(packed, zeros, zeros.clone(), in_f)
        lines = out_f * groups
        codes = torch.zeros(lines, k, dtype=torch.uint8, device=w.device)
        steps = torch.zeros(-(-lines // spec.range_block), 2, k, dtype=spec.scale_dtype, device=w.device)
        coded = CodedRanges(codes, codes.clone(), steps)
        return QuantizedWeight(packed, zeros, zeros.clone(), in_f, pack_range_codes(coded, spec), steps)
    if ids is not None and tuple(ids.shape) != (out_f, in_f):
        raise ValueError(f"ids must have the weight's shape {(out_f, in_f)}, got {tuple(ids.shape)}")
    if ids is not None and not (int(ids.min()) >= 0 and int(ids.max()) < k):
        raise ValueError(f"cluster ids must lie in [0, {k - 1}], got [{int(ids.min())}, {int(ids.max())}]")
    bounds = _boundaries(w, spec) if ids is None else None
    step = max(1, _CHUNK_WEIGHTS // max(in_f, 1))
    if spec.range_bits is not None:  # chunks of whole blocks of lines: the coding never crosses a chunk
        whole = spec.range_block // math.gcd(groups, spec.range_block)
        step = -(-step // whole) * whole
    parts = []
    for r0 in range(0, out_f, step):
        wc = w[r0 : r0 + step].to(torch.float32)
        if ids is not None:
            idc = ids[r0 : r0 + step]
        elif k == 1:  # one cluster: every id is 0 (a view, no memory)
            idc = zero_ids(wc)
        else:
            idc = assign_clusters(wc, bounds if bounds.shape[0] == 1 else bounds[r0 : r0 + step])
        parts.append(_quantize_rows(wc, idc, spec, groups))
    if spec.range_bits is None:
        packed, scale, offset = (torch.cat(t) for t in zip(*parts, strict=True))
        return QuantizedWeight(packed, scale, offset, in_f)
    packed, scale, offset, coded = zip(*parts, strict=True)
    coded = CodedRanges(
        torch.cat([c.scale_codes for c in coded]),
        torch.cat([c.offset_codes for c in coded]),
        torch.cat([c.steps for c in coded]),
    )
    packed = torch.cat(packed)
    return QuantizedWeight(
        packed, torch.cat(scale), torch.cat(offset), in_f, pack_range_codes(coded, spec), coded.steps
    )


def _quantize_rows(w: torch.Tensor, ids: torch.Tensor, spec: QuantSpec, groups: int):
    """Packed rows, scale and offset of float32 rows ``w`` with cluster ids ``ids``.

    Every weight has a slot ``(row, group, cluster)``; one scatter pass per bound gives each slot's
    min and max (an empty slot stores 0 and 0).
    """
    out_f, in_f = w.shape
    k = spec.num_clusters
    rows = out_f * groups  # one line per (row, group): its k slots, its weights and their ids
    idg = ids.reshape(rows, -1)
    wg = w.reshape(rows, -1)
    if k == 1:  # every weight in the one slot of its line
        lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)  # (aminmax per line: 5x slower)
    else:
        lo = torch.full((rows, k), torch.inf, device=w.device).scatter_reduce_(1, idg, wg, "amin")
        hi = torch.full((rows, k), -torch.inf, device=w.device).scatter_reduce_(1, idg, wg, "amax")
        empty = torch.isinf(lo)
        lo.masked_fill_(empty, 0.0)
        hi.masked_fill_(empty, 0.0)
    coded = None
    if spec.fit == "mse":
        idg, codes, offset, scale = fit_best_start(wg, idg, lo, hi, spec)
        if spec.range_bits is not None:
            idg, codes, offset, scale, coded = fit_coded(wg, offset, scale, spec)
    else:
        offset, scale = stored_range(lo, hi, spec)
        codes = grid_codes(wg, offset.float().gather(1, idg), scale.float().gather(1, idg), spec)
    offset, scale = offset.view(out_f, groups, k), scale.view(out_f, groups, k)
    symbols = codes.to(torch.int32)
    if k > 1:
        symbols.bitwise_or_(idg.to(torch.int32) << spec.bits)
    packed = pack_rows(symbols.reshape(out_f, in_f), spec.symbol_width)
    return (packed, scale, offset) if coded is None else (packed, scale, offset, coded)


def decode_symbols(packed: torch.Tensor, in_features: int, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack ``(cluster ids, codes)``, both int64 ``(out, in_features)``."""
    sym = unpack_rows(packed, spec.symbol_width, in_features)
    return sym >> spec.bits, sym & (spec.levels - 1)


def dequantize_weight(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    in_features: int,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
    column_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild the ``(out, in_features)`` float weight from its compact tensors (times ``column_scale``)."""
    out_f = packed.shape[0]
    groups = scale.shape[1]
    sym = unpack_rows(packed, spec.symbol_width, in_features)
    if sym.numel() == 0:
        return torch.zeros(out_f, in_features, dtype=dtype, device=packed.device)
    table = offset.float().unsqueeze(-1) + scale.float().unsqueeze(-1) * torch.arange(
        spec.levels, dtype=torch.float32, device=packed.device
    )
    table = table.reshape(out_f, groups, spec.num_clusters * spec.levels)
    w = table.gather(-1, sym.view(out_f, groups, -1)).reshape(out_f, in_features)
    if column_scale is not None:
        w = w * column_scale.float()
    return w.to(dtype)


def split_branches(qweight: QuantizedWeight, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The ``num_clusters`` dense branches of the paper: branch ``j`` keeps cluster ``j``'s values, zeros elsewhere."""
    w = dequantize_weight(
        qweight.packed, qweight.scale, qweight.offset, qweight.in_features, spec, dtype, qweight.column_scale
    )
    ids, _ = decode_symbols(qweight.packed, qweight.in_features, spec)
    return [torch.where(ids == j, w, torch.zeros((), dtype=dtype)) for j in range(spec.num_clusters)]


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _checked(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {weight.dtype}")
    if weight.numel():
        lo, hi = (float(t) for t in torch.aminmax(weight.detach()))  # aminmax propagates NaN: one pass, no mask
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("weight contains NaN or infinite values")
        if max(-lo, hi) > _FLOAT32_MAX:  # a float64 weight: the quantizer computes in float32
            raise ValueError(
                f"weight values reach {max(-lo, hi):.4g}, beyond float32 (±{_FLOAT32_MAX:.4g}), the precision "
                "SplitQuant quantizes in; scale the weight down before quantizing"
            )
    return weight.detach()
