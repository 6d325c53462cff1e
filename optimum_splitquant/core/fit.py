"""How the range of each (row, group, cluster) slot is chosen, and each weight's code on it.

``fit="minmax"`` stores each slot's member minimum and maximum, rounded outwards to ``scale_dtype``
(:func:`stored_range`); ``fit="mse"`` starts from several shrunk min-max grids
(:data:`FIT_STARTS`), keeps the best per line, and alternates least-squares refits of the ranges with
moving every weight to its nearest level (:func:`fit_best_start`); with coded ranges the fitted
ranges are then coded and the weights moved to the coded grid (:func:`fit_coded`). The optional
compiled CPU kernels (:mod:`optimum_splitquant.kernels`) give the same bits as the torch code here.
"""

from __future__ import annotations

import contextlib

import torch

from .ranges import CodedRanges, code_variants, decode_ranges, encode_ranges
from .spec import QuantSpec

__all__ = [
    "FIT_ITERATIONS",
    "FIT_STARTS",
    "FIT_TRIAL_ITERATIONS",
    "SUM_LANES",
    "fit_best_start",
    "fit_coded",
    "fit_mse",
    "grid_codes",
    "nearest_levels",
    "range_error",
    "start_ranges",
    "stored_range",
    "zero_ids",
]


def grid_codes(w: torch.Tensor, off: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
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


def fit_best_start(
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
        with contextlib.suppress(RuntimeError):  # a range past the storage dtype: start_ranges names it
            starts = kernels.start_ranges(lo, hi, kept, spare, spec.bits, spec.scale_dtype)
        offsets, scales = starts if starts is not None else start_ranges(lo, hi, spec)
        try:
            fitted = kernels.fit_mse_starts(w, ids, offsets, scales, spec.bits, trial, FIT_ITERATIONS)
        except RuntimeError as exc:  # the only failure of valid inputs: a range past the storage dtype
            raise ValueError(_overflow_message(spec)) from exc
        if fitted is not None:
            return fitted
    else:
        offsets, scales = start_ranges(lo, hi, spec)
    best = best_err = None
    for offset, scale in zip(offsets, scales, strict=True):
        codes = grid_codes(w, offset.float().gather(1, ids), scale.float().gather(1, ids), spec)
        fit = fit_mse(w, ids, codes, offset, scale, spec, trial)
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
    return fit_mse(w, *best, spec, FIT_ITERATIONS - trial)


def start_ranges(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets, scales)`` ``(starts, lines, k)`` of every :data:`FIT_STARTS` grid of each slot ``[lo, hi]``."""
    mid = (lo + hi) / 2
    kept, spare = (torch.tensor(t, device=lo.device).view(-1, 1, 1) for t in zip(*FIT_STARTS, strict=True))
    try:
        return stored_range(mid + (lo - mid) * kept, mid + (hi - mid) * kept, spec, spare)
    except ValueError:  # named by the members' range (a shrunk start past float32 is NaN)
        raise range_error(lo, hi, spec) from None


def fit_mse(
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
        ids, codes = nearest_levels(w, offset.float(), scale.float(), spec)
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


def fit_coded(
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
        errors = _line_errors(w, [decode_ranges(c, spec) for c in candidates], spec)
        best = errors.argmin(1, keepdim=True)  # the first of equal errors: the nearest codes first
        pick = lambda name: torch.stack([getattr(c, name) for c in candidates], 1).gather(  # noqa: E731
            1, best.unsqueeze(2).expand(-1, 1, coded.scale_codes.shape[1])
        )[:, 0]
        coded = CodedRanges(pick("scale_codes"), pick("offset_codes"), coded.steps)
    scale, offset = decode_ranges(coded, spec)
    ids, codes = nearest_levels(w, offset.float(), scale.float(), spec)
    return ids, codes, offset, scale, coded


_ERROR_CHUNK = 1 << 18
"""Elements (weights times candidates) per chunk of :func:`_line_errors`' torch path: its work buffers (two
float32, one float64) stay in cache and are reused, instead of a fresh full-size temporary per operation and
candidate."""


def _line_errors(w: torch.Tensor, ranges: list[tuple[torch.Tensor, torch.Tensor]], spec: QuantSpec) -> torch.Tensor:
    """``(lines, candidates)`` float64 :func:`_line_error` of each line of ``w`` for each range of ``ranges``.

    With one cluster every candidate's codes, levels and errors are computed by the same float32 operations
    as :func:`grid_codes` and :func:`_line_error`, squared and summed over the lanes in float64 (the same
    bits): on CPU by the compiled kernel, else in chunks of lines held in reused buffers.
    """
    if spec.num_clusters > 1:
        return torch.cat([_line_error(w, scale, offset, spec) for scale, offset in ranges], 1)
    lines, g = w.shape
    scale = torch.stack([s.float().view(-1) for s, _ in ranges])  # (candidates, lines)
    offset = torch.stack([o.float().view(-1) for _, o in ranges])
    if w.device.type == "cpu":
        from .. import kernels

        found = kernels.line_errors(w, offset, scale, spec.bits)
        if found is not None:
            return found
    positive = scale > 0
    divisor = torch.where(positive, scale, 1.0)
    ok = positive.float()  # the steps of a non-positive scale are 0, as in grid_codes
    errors = torch.empty_like(scale, dtype=torch.float64)
    step = max(1, _ERROR_CHUNK // max(g * len(ranges), 1))
    diff = torch.empty(len(ranges), min(step, lines), g, device=w.device)
    level = torch.empty_like(diff)
    square = torch.empty_like(diff, dtype=torch.float64)
    for l0 in range(0, lines, step):
        l1 = min(l0 + step, lines)
        d, q, sq = diff[:, : l1 - l0], level[:, : l1 - l0], square[:, : l1 - l0]
        torch.sub(w[l0:l1], offset[:, l0:l1, None], out=d)
        torch.div(d, divisor[:, l0:l1, None], out=q)
        q.mul_(ok[:, l0:l1, None]).round_().clamp_(0, spec.levels - 1).mul_(scale[:, l0:l1, None])
        sq.copy_(d.sub_(q)).square_()
        errors[:, l0:l1] = _lane_sums(sq.reshape(-1, g)).view(len(ranges), l1 - l0)
    return errors.t().contiguous()  # laid out as the candidates' columns side by side: a fast argmin


def _line_error(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``(lines, 1)`` float64 squared error of each line of ``w`` on the nearest levels of ``scale`` / ``offset``.

    The float32 errors squared and summed over the lanes in float64 (:func:`_lane_sums`).
    """
    scale, offset = scale.float(), offset.float()
    ids, codes = nearest_levels(w, offset, scale, spec)
    if spec.num_clusters > 1:
        scale, offset = scale.gather(1, ids), offset.gather(1, ids)
    return _lane_sums((w - offset).sub_(codes * scale).double().square_())


def _overflow_message(spec: QuantSpec) -> str:
    return f"the fitted ranges do not fit scale_dtype {spec.scale_dtype}; {spec.overflow_advice()}"


def nearest_levels(
    w: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, codes)`` of the level nearest to each weight among its line's clusters (lowest id on ties)."""
    if w.device.type == "cpu":
        from .. import kernels

        found = kernels.nearest_levels(w, offset, scale, spec.bits)
        if found is not None:
            return found
    if spec.num_clusters == 1:
        return zero_ids(w), grid_codes(w, offset, scale, spec)
    best_err = best_ids = best_codes = None
    for j in range(spec.num_clusters):
        off_j, scale_j = offset[:, j : j + 1], scale[:, j : j + 1]
        code = grid_codes(w, off_j, scale_j, spec)
        err = (w - (off_j + code * scale_j)).abs_()
        if best_err is None:
            best_err, best_ids, best_codes = err, torch.zeros_like(w, dtype=torch.int64), code
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ids = best_ids.masked_fill(better, j)
        best_codes = torch.where(better, code, best_codes)
    return best_ids, best_codes


def zero_ids(w: torch.Tensor) -> torch.Tensor:
    """Cluster ids of a one-cluster fit: 0 for every weight of ``w``, as an expanded (read-only) view."""
    return torch.zeros((), dtype=torch.int64, device=w.device).expand(w.shape)


def stored_range(
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
        raise range_error(lo, hi, spec)
    return offset, scale


def range_error(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> ValueError:
    return ValueError(
        f"weight range [{float(lo.min()):.4g}, {float(hi.max()):.4g}] does not fit scale_dtype {spec.scale_dtype}; "
        f"{spec.overflow_advice()}"
    )
