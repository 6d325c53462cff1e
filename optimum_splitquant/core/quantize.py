"""Split quantization of one weight matrix into the compact representation, and back.

A weight ``W`` of shape ``(out, in)`` is clustered by 1-D k-means (over the whole tensor, or per
output row), every weight gets a cluster id, and inside each (row, range group, cluster) the
member weights are quantized with their own asymmetric min-max range to ``bits``-bit codes::

    symbol  = cluster_id << bits | code                      (packed by core.packing)
    W_hat   = offset[row, group, id] + code * scale[row, group, id]

``W_hat`` equals the sum of the ``k`` separately quantized branches of the paper (each branch
holds its cluster's values and exact zeros elsewhere), in one tensor and one matmul.

With ``spec.range_bits`` set, the ranges are stored as codes times per-block steps
(:mod:`.ranges`): the fitted ranges are coded, then every weight moves to the nearest level of
the coded ranges.

Ranges are rounded outwards when stored: ``offset`` is the cluster minimum rounded down to
``scale_dtype`` and ``scale`` is rounded up, so the stored grid always covers the cluster and
every weight is within half a (stored) step of its reconstruction. A cluster with no member in a
(row, group) stores ``scale = offset = 0``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .kmeans import assign_clusters, kmeans_1d
from .packing import pack_rows, packed_row_bytes, unpack_rows
from .ranges import CodedRanges, code_variants, decode_ranges, encode_ranges, pack_range_codes
from .spec import QuantSpec

__all__ = [
    "QuantizedWeight",
    "cluster_ids",
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
    """

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    in_features: int
    range_codes: torch.Tensor | None = None
    range_steps: torch.Tensor | None = None


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
            idc = _zero_ids(wc)
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
        lo, hi = (t.unsqueeze(1) for t in torch.aminmax(wg, dim=1))
    else:
        lo = torch.full((rows, k), torch.inf, device=w.device).scatter_reduce_(1, idg, wg, "amin")
        hi = torch.full((rows, k), -torch.inf, device=w.device).scatter_reduce_(1, idg, wg, "amax")
        empty = torch.isinf(lo)
        lo.masked_fill_(empty, 0.0)
        hi.masked_fill_(empty, 0.0)
    coded = None
    if spec.fit == "mse":
        idg, codes, offset, scale = _fit_best_start(wg, idg, lo, hi, spec)
        if spec.range_bits is not None:
            idg, codes, offset, scale, coded = _fit_coded(wg, offset, scale, spec)
    else:
        offset, scale = _stored_range(lo, hi, spec)
        codes = _codes(wg, offset.float().gather(1, idg), scale.float().gather(1, idg), spec)
    offset, scale = offset.view(out_f, groups, k), scale.view(out_f, groups, k)
    symbols = codes.to(torch.int32)
    if k > 1:
        symbols.bitwise_or_(idg.to(torch.int32) << spec.bits)
    packed = pack_rows(symbols.reshape(out_f, in_f), spec.symbol_width)
    return (packed, scale, offset) if coded is None else (packed, scale, offset, coded)


def _codes(w: torch.Tensor, off: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Nearest code of every weight on the grid ``off + code * scale`` (``off``/``scale`` broadcast to ``w``)."""
    positive = scale > 0
    steps = torch.where(positive, (w - off) / torch.where(positive, scale, 1.0), 0.0)
    return steps.round_().clamp_(0, spec.levels - 1)


FIT_ITERATIONS = 6
"""Refit / reassign rounds of ``fit="mse"``: each round lowers (or keeps) the squared error."""

FIT_STARTS: tuple[tuple[float, int], ...] = ((1.0, 0), (1.0, 1), (0.9, 0), (0.8, 0))
"""Starting grids of ``fit="mse"``, as ``(kept, spare)``: each slot's min-max range shrunk to the share
``kept`` around its middle, spread over ``levels - 1 - spare`` steps (``spare`` codes past the top).
Each start is refitted for :data:`FIT_TRIAL_ITERATIONS` rounds; every (row, group) keeps the start
with the least squared error and refits it for the rest of :data:`FIT_ITERATIONS`."""

FIT_TRIAL_ITERATIONS = 2
"""Rounds each start of :data:`FIT_STARTS` gets before the best one per (row, group) is kept."""


def _fit_best_start(
    w: torch.Tensor, ids: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, codes, offset, scale)`` of the best :data:`FIT_STARTS` fit of each line of ``w``.

    ``lo`` / ``hi`` are each (line, cluster) slot's member minimum and maximum (0 for empty slots).
    """
    trial = min(FIT_TRIAL_ITERATIONS, FIT_ITERATIONS)
    if w.device.type == "cpu":
        from .. import kernels  # optional compiled ops (a leaf: torch only)

        starts = None
        kept, spare = (list(t) for t in zip(*FIT_STARTS, strict=True))
        with contextlib.suppress(RuntimeError):  # a range past the storage dtype: _start_ranges names it
            starts = kernels.start_ranges(lo, hi, kept, spare, spec.bits, spec.scale_dtype)
        offsets, scales = starts if starts is not None else _start_ranges(lo, hi, spec)
        try:
            fitted = kernels.fit_mse_starts(w, ids, offsets, scales, spec.bits, trial, FIT_ITERATIONS)
        except RuntimeError as exc:  # the only failure of valid inputs: a range past the storage dtype
            raise ValueError(_overflow_message(spec)) from exc
        if fitted is not None:
            return fitted
    else:
        offsets, scales = _start_ranges(lo, hi, spec)
    best = best_err = None
    for offset, scale in zip(offsets, scales, strict=True):
        codes = _codes(w, offset.float().gather(1, ids), scale.float().gather(1, ids), spec)
        fit = _fit_mse(w, ids, codes, offset, scale, spec, trial)
        f_ids, f_codes, f_off, f_scale = fit
        rebuilt = f_off.float().gather(1, f_ids) + f_codes * f_scale.float().gather(1, f_ids)
        # Summed over lanes as the compiled kernel sums: the same choice on both paths.
        err = _lane_sums((w - rebuilt).double().square_())
        if best is None:
            best, best_err = list(fit), err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = [torch.where(better, new, old) for new, old in zip(fit, best, strict=True)]
    return _fit_mse(w, *best, spec, FIT_ITERATIONS - trial)


def _start_ranges(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets, scales)`` ``(starts, lines, k)`` of every :data:`FIT_STARTS` grid of each slot ``[lo, hi]``."""
    mid = (lo + hi) / 2
    kept, spare = (torch.tensor(t, device=lo.device).view(-1, 1, 1) for t in zip(*FIT_STARTS, strict=True))
    try:
        return _stored_range(mid + (lo - mid) * kept, mid + (hi - mid) * kept, spec, spare)
    except ValueError:  # named by the members' range (a shrunk start past float32 is NaN)
        raise _range_error(lo, hi, spec) from None


def _fit_mse(
    w: torch.Tensor,
    ids: torch.Tensor,
    codes: torch.Tensor,
    offset: torch.Tensor,
    scale: torch.Tensor,
    spec: QuantSpec,
    iterations: int = FIT_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares ranges for ``lines`` of weights ``w`` (one line per (row, group)), from the given ones.

    Each (line, cluster) holds the levels ``offset + code * scale``. A round refits every slot's
    offset and scale to its members by least squares (the squared error cannot grow), rounds them
    to ``spec.scale_dtype``, then moves every weight to the nearest of its line's ``k * 2**bits``
    levels, in any cluster (nor can it grow there). A slot left without members keeps its range.
    Returns ``(ids, codes, offset, scale)``; the codes are the nearest ones under the stored ranges.
    """
    lines, k = offset.shape
    # Every (line, cluster) sum is split over SUM_LANES running sums, element i in lane i % SUM_LANES.
    lane = torch.arange(w.shape[1], device=w.device) % SUM_LANES
    line_base = torch.arange(lines, device=w.device).unsqueeze(1) * k
    wd = w.to(torch.float64).view(-1)
    for _ in range(iterations):
        slot = ((ids + line_base) * SUM_LANES + lane).view(-1)
        c = codes.to(torch.float64).view(-1)
        n, sc, sw, scc, scw = (
            _add_lanes(torch.bincount(slot, weights=x, minlength=lines * k * SUM_LANES).to(torch.float64)).view(
                lines, k
            )
            for x in (None, c, wd, c * c, c * wd)
        )
        var = n * scc - sc * sc
        new_scale = torch.where(var > 0, (n * scw - sc * sw) / torch.where(var > 0, var, 1.0), scale.double())
        new_scale = torch.where(new_scale > 0, new_scale, 0.0)
        new_offset = torch.where(n > 0, (sw - new_scale * sc) / n.clamp(min=1.0), offset.double())
        # Through float32, as the compiled kernel rounds: the same bits on both paths.
        offset, scale = new_offset.float().to(spec.scale_dtype), new_scale.float().to(spec.scale_dtype)
        if not (bool(torch.isfinite(offset).all()) and bool(torch.isfinite(scale).all())):
            raise ValueError(_overflow_message(spec))
        ids, codes = _nearest_levels(w, offset.float(), scale.float(), spec)
    return ids, codes, offset, scale


SUM_LANES = 8
"""Running sums per total in the fit's double sums (element ``i`` of a line in lane ``i % SUM_LANES``), added
pairwise, ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``: the compiled kernel's independent chains,
the same bits here."""


def _add_lanes(sums: torch.Tensor) -> torch.Tensor:
    """Totals of lane sums laid out last, ``SUM_LANES`` per total, added pairwise."""
    a = sums.view(-1, SUM_LANES)
    while a.shape[1] > 1:
        a = a[:, 0::2] + a[:, 1::2]
    return a[:, 0]


def _lane_sums(x: torch.Tensor) -> torch.Tensor:
    """``(lines, 1)`` totals of the rows of ``x`` (float64), each summed in element order over the lanes."""
    lines, g = x.shape
    padded = torch.nn.functional.pad(x, (0, -g % SUM_LANES))  # + 0.0 leaves a sum of squares unchanged
    per_lane = padded.view(lines, -1, SUM_LANES).cumsum(1)[:, -1]  # a running sum per lane
    return _add_lanes(per_lane).view(lines, 1)


def _fit_coded(
    w: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, CodedRanges]:
    """``(ids, codes, offset, scale, coded)`` of lines ``w`` on the coded form of fitted ranges.

    The lines are whole blocks of ``spec.range_block`` (but for the weight's last chunk). In format 3
    each line keeps the one of its nearest range codes and their :func:`~.ranges.code_variants` whose
    levels give it the least squared error; then every weight moves to the nearest level of the
    decoded ranges. (A least-squares refit of the coded ranges and a second reassignment gained
    under 0.02 dB of SQNR on Gaussian weights at twice the time, so there is none.)
    """
    coded = encode_ranges(scale, offset, spec)
    if spec.signed_offsets:
        candidates = [coded, *code_variants(coded, spec)]
        errors = torch.cat([_line_error(w, *decode_ranges(c, spec), spec) for c in candidates], 1)
        best = errors.argmin(1, keepdim=True)  # the first of equal errors: the nearest codes first
        pick = lambda name: torch.stack([getattr(c, name) for c in candidates], 1).gather(  # noqa: E731
            1, best.unsqueeze(2).expand(-1, 1, coded.scale_codes.shape[1])
        )[:, 0]
        coded = CodedRanges(pick("scale_codes"), pick("offset_codes"), coded.steps)
    scale, offset = decode_ranges(coded, spec)
    ids, codes = _nearest_levels(w, offset.float(), scale.float(), spec)
    return ids, codes, offset, scale, coded


def _line_error(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``(lines, 1)`` squared error of each line of ``w`` on the nearest levels of ranges ``scale`` / ``offset``."""
    scale, offset = scale.float(), offset.float()
    ids, codes = _nearest_levels(w, offset, scale, spec)
    if spec.num_clusters > 1:
        scale, offset = scale.gather(1, ids), offset.gather(1, ids)
    return (w - offset).sub_(codes * scale).square_().sum(1, keepdim=True)


def _overflow_message(spec: QuantSpec) -> str:
    return f"the fitted ranges do not fit scale_dtype {spec.scale_dtype}; {spec.overflow_advice()}"


def _nearest_levels(
    w: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, codes)`` of the level nearest to each weight among its line's clusters (lowest id on ties)."""
    if w.device.type == "cpu":
        from .. import kernels

        found = kernels.nearest_levels(w, offset, scale, spec.bits)
        if found is not None:
            return found
    if spec.num_clusters == 1:
        return _zero_ids(w), _codes(w, offset, scale, spec)
    best_err = best_ids = best_codes = None
    for j in range(spec.num_clusters):
        off_j, scale_j = offset[:, j : j + 1], scale[:, j : j + 1]
        code = _codes(w, off_j, scale_j, spec)
        err = (w - (off_j + code * scale_j)).abs_()
        if best_err is None:
            best_err, best_ids, best_codes = err, torch.zeros_like(w, dtype=torch.int64), code
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ids = best_ids.masked_fill(better, j)
        best_codes = torch.where(better, code, best_codes)
    return best_ids, best_codes


def _zero_ids(w: torch.Tensor) -> torch.Tensor:
    """Cluster ids of a one-cluster fit: 0 for every weight of ``w``, as an expanded (read-only) view."""
    return torch.zeros((), dtype=torch.int64, device=w.device).expand(w.shape)


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
) -> torch.Tensor:
    """Rebuild the ``(out, in_features)`` float weight from its compact tensors."""
    out_f = packed.shape[0]
    groups = scale.shape[1]
    sym = unpack_rows(packed, spec.symbol_width, in_features)
    if sym.numel() == 0:
        return torch.zeros(out_f, in_features, dtype=dtype, device=packed.device)
    table = offset.float().unsqueeze(-1) + scale.float().unsqueeze(-1) * torch.arange(
        spec.levels, dtype=torch.float32, device=packed.device
    )
    table = table.reshape(out_f, groups, spec.num_clusters * spec.levels)
    w = table.gather(-1, sym.view(out_f, groups, -1))
    return w.reshape(out_f, in_features).to(dtype)


def split_branches(qweight: QuantizedWeight, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The ``num_clusters`` dense branches of the paper: branch ``j`` keeps cluster ``j``'s values, zeros elsewhere."""
    w = dequantize_weight(qweight.packed, qweight.scale, qweight.offset, qweight.in_features, spec, dtype)
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


def _stored_range(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, spare: int | torch.Tensor = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset rounded down and scale rounded up to ``spec.scale_dtype`` so the grid covers ``[lo, hi]``.

    ``spare`` top codes are left past ``hi`` (the range spans ``levels - 1 - spare`` steps); a tensor of
    spares broadcasts against ``lo`` and ``hi``.
    """
    dt = spec.scale_dtype
    offset = lo.to(dt)
    too_high = offset.float() > lo
    offset = torch.where(too_high, torch.nextafter(offset, torch.full_like(offset, -torch.inf)), offset)
    steps = spec.levels - 1 - spare
    exact = (hi - offset.float()) / (steps.clamp(min=1).float() if torch.is_tensor(steps) else max(steps, 1))
    scale = exact.to(dt)
    too_low = scale.float() < exact
    scale = torch.where(too_low, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    if not (bool(torch.isfinite(offset).all()) and bool(torch.isfinite(scale).all())):
        raise _range_error(lo, hi, spec)
    return offset, scale


def _range_error(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> ValueError:
    return ValueError(
        f"weight range [{float(lo.min()):.4g}, {float(hi.max()):.4g}] does not fit scale_dtype {spec.scale_dtype}; "
        f"{spec.overflow_advice()}"
    )
