"""Checks that a quantized layer's stored tensors can come from a valid quantization.

:func:`check_layer` (what :meth:`SplitQuantModule.validate <.compact.SplitQuantModule.validate>` runs)
and :func:`validate_layers` (a model's worth at load) raise ``ValueError`` naming the tensor and the
problem: a scale or offset not finite or a negative scale, ranges whose rebuilt weights overflow the
compute dtype, or a cluster id at or above ``num_clusters`` (row padding included); with column
scales (format 4), a column scale not finite and positive, or one that takes the rebuilt weights
past the compute dtype. With coded
ranges the scales and offsets checked are the ones the stored codes decode to (decoded for the check,
then dropped). Never a decode of each weight: on CPU, one compiled pass over the ranges and the
packed bytes (``kernels.check_stored``) when the kernels load; otherwise a few vectorised torch passes
and the word-wise id check :func:`ids_in_range`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .. import kernels
from ..checkpoint.format import COLUMN_SCALE, OFFSET, PACKED, RANGE_CODES, RANGE_STEPS, SCALE
from ..core.packing import unpack_rows
from ..core.spec import QuantSpec

if TYPE_CHECKING:
    from .compact import SplitQuantModule

__all__ = ["check_layer", "ids_in_range", "validate_layers"]

_VERDICT_BATCH_BYTES = 64 << 20
"""Decoded ranges held at once while :func:`validate_layers` checks coded layers in one compiled call."""


def check_layer(layer: SplitQuantModule, dtype: torch.dtype | None = None) -> None:
    """Raise ``ValueError`` if ``layer``'s stored tensors cannot come from a valid quantization.

    ``dtype`` is the compute dtype (default float32, the dtype weights are rebuilt in): every rebuilt
    weight must be finite in it.
    """
    dtype = dtype or torch.float32
    scale, offset = layer.ranges()
    verdict = _compiled_verdicts([(layer.weight_packed, scale, offset, layer.spec)], dtype)
    verdict = verdict[0] if verdict else None
    if verdict == 1 or (verdict is None and not _ranges_ok(scale, offset, layer.spec, dtype)):
        _raise_bad_range(scale, offset, layer.spec, dtype, layer.coded)
    if verdict == 2 or (verdict is None and not ids_in_range(layer.weight_packed, layer.spec)):
        _raise_bad_id(layer.weight_packed, layer.spec, layer.in_features)
    _check_column_scale(layer.column_scale(), scale, offset, layer.spec, dtype)


def _check_column_scale(
    column_scale: torch.Tensor | None, scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec, dtype: torch.dtype
) -> None:
    """Column scales finite and positive, and the largest rebuilt weight times the largest of them finite
    in ``dtype`` (the ranges themselves are checked already)."""
    if column_scale is None or not column_scale.numel():
        return
    low, high = (float(v) for v in torch.aminmax(column_scale.float()))
    if not (math.isfinite(low) and math.isfinite(high) and low > 0):
        raise ValueError(f"{COLUMN_SCALE} holds values that are not finite and positive (min {low}, max {high})")
    if scale.numel():
        largest = torch.maximum(
            offset.float().abs(), torch.add(offset.float(), scale.float(), alpha=spec.levels - 1).abs()
        )
        bound = float(largest.max()) * high
        if not math.isfinite(torch.tensor(bound, dtype=torch.float64).to(dtype).item()):
            raise ValueError(
                f"{COLUMN_SCALE} (up to {high:.4g}) takes the rebuilt weights to {bound:.4g}, past {dtype}"
            )


def validate_layers(layers: dict[str, SplitQuantModule], dtype: torch.dtype | None = None) -> None:
    """:func:`check_layer` of every layer; the ``ValueError`` starts with the layer's name.

    The CPU layers are checked in compiled calls when the kernels load (a model's worth in a few
    milliseconds; coded layers' ranges decoded a batch at a time); a layer found bad, and any other
    layer, go through :func:`check_layer` itself.
    """
    dtype = dtype or torch.float32
    verdicts: dict[str, int] = {}
    column_errors: dict[str, ValueError] = {}
    batch: dict[str, tuple] = {}
    held = 0
    on_cpu = [name for name, layer in layers.items() if layer.weight_packed.device.type == "cpu"]
    for i, name in enumerate(on_cpu):
        layer = layers[name]
        scale, offset = layer.ranges()
        try:  # while the ranges are decoded: a coded layer's are not decoded again
            _check_column_scale(layer.column_scale(), scale, offset, layer.spec, dtype)
        except ValueError as exc:
            column_errors[name] = exc
        batch[name] = (layer.weight_packed, scale, offset, layer.spec)
        held += (scale.numel() + offset.numel()) * scale.element_size() if layer.coded else 0
        if held >= _VERDICT_BATCH_BYTES or i == len(on_cpu) - 1:
            found = _compiled_verdicts(list(batch.values()), dtype)
            if found is None:
                break
            verdicts.update(zip(batch, found, strict=True))
            batch, held = {}, 0
    for name, layer in layers.items():
        try:
            if verdicts.get(name) != 0:
                check_layer(layer, dtype)
            elif name in column_errors:
                raise column_errors[name]
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None


def _compiled_verdicts(
    entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, QuantSpec]], dtype: torch.dtype
) -> list[int] | None:
    """``kernels.check_stored`` of CPU ``(packed, scale, offset, spec)`` entries (0 valid, 1 bad range, 2 bad id), or None."""
    if not entries or any(packed.device.type != "cpu" for packed, *_ in entries):
        return None
    return kernels.check_stored(
        [e[0] for e in entries],
        [e[1] for e in entries],
        [e[2] for e in entries],
        [e[3].bits for e in entries],
        [e[3].symbol_width for e in entries],
        [e[3].num_clusters for e in entries],
        dtype,
    )


def _ranges_ok(scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> bool:
    """Scales non-negative, and both ends of every range finite in float32 and in ``dtype``.

    Weights are rebuilt in float32 as ``offset + code * scale`` (codes ``0 .. levels - 1``), so
    the extremes of ``offset`` and ``offset + (levels - 1) * scale`` bound every rebuilt weight.
    Three ``aminmax`` reductions and one cast of six numbers (NaN propagates through them): a
    fraction of the cost of element-wise ``isfinite`` on small tensors.
    """
    if not scale.numel():
        return True
    scale, offset = scale.float(), offset.float()
    high = torch.add(offset, scale, alpha=spec.levels - 1)
    ends = torch.stack([*torch.aminmax(scale), *torch.aminmax(offset), *torch.aminmax(high)])
    smallest_scale, *_ = ends.tolist()
    return smallest_scale >= 0 and all(math.isfinite(v) for v in ends.to(dtype).tolist())


def _raise_bad_range(
    scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec, dtype: torch.dtype, coded: bool
) -> None:
    """Name what :func:`_ranges_ok` found (slow path: runs only once something was found)."""
    source = f" (rebuilt from {RANGE_CODES} and {RANGE_STEPS})" if coded else ""
    for name, tensor in ((SCALE, scale), (OFFSET, offset)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name}{source} holds NaN or infinite values")
    if bool((scale < 0).any()):
        raise ValueError(f"{SCALE}{source} holds negative values")
    low = offset.float()
    high = low + scale.float() * (spec.levels - 1)
    largest = float(torch.stack((low, high)).abs().max())
    raise ValueError(
        f"{SCALE} and {OFFSET}{source} rebuild weights of magnitude up to {largest:.6g}, which overflow {dtype} "
        f"(largest finite value {torch.finfo(dtype).max:.6g}); the values are damaged, or the model needs a "
        "wider compute dtype: load it with dtype=torch.float32"
    )


def _raise_bad_id(packed: torch.Tensor, spec: QuantSpec, in_features: int) -> None:
    """Name the largest cluster id (slow path: runs only once a bad id was found)."""
    count = packed.shape[1] * 8 // spec.symbol_width  # every symbol of a row, padding included
    ids = unpack_rows(packed, spec.symbol_width, count) >> spec.bits
    top = int(ids[:, :in_features].max()) if in_features else 0
    if top >= spec.num_clusters:
        raise ValueError(
            f"{PACKED} holds cluster id {top}, but num_clusters={spec.num_clusters}: "
            "the codes do not match the declared settings"
        )
    raise ValueError(
        f"{PACKED} holds cluster id {int(ids.max())} in the padding after a row's last weight "
        f"(num_clusters={spec.num_clusters}; a writer pads rows with zero symbols): the tensor is damaged"
    )


def ids_in_range(packed: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether every symbol of ``packed`` (padding included) holds a cluster id below ``spec.num_clusters``.

    Vectorised over 64-bit words, without decoding a symbol: eight symbols fill ``w`` bytes
    (:mod:`optimum_splitquant.core.packing`), so each run of eight (four when ``w > 8``) is read as one
    word with symbol ``s`` at bits ``[s * w, (s + 1) * w)`` and its cluster id in the top
    ``id_bits``. Shifting out the code bits and masking leaves each id in a field with free bits
    above it; adding ``2**id_bits - k`` to every field carries into the bit above exactly the ids
    ``>= k`` (a SWAR comparison). Widths 1, 2, 4 and 8 keep symbols inside bytes, so the packed
    bytes are read as words in place; other widths copy each run into a word first.
    """
    k, id_bits, bits, width = spec.num_clusters, spec.id_bits, spec.bits, spec.symbol_width
    if k == 1 << id_bits or not packed.numel():
        return True  # every id pattern is a valid cluster
    flat = packed.contiguous().view(-1)
    if flat.storage_offset() % 8:  # reading bytes as int64 needs an 8-aligned start
        flat = flat.clone()
    if 8 % width == 0:
        slots, starts = 8 // width * 8, [0]
        body = flat.numel() // 8 * 8
        words = [flat[:body].view(torch.int64)] if body else []
        if body < flat.numel():
            words.append(_words(flat[body:].view(1, -1), [(0, flat.numel() - body)]))
    else:
        per = 8 if width < 8 else 4  # symbols per word; four of at most 12 bits leave room for a shift
        starts = [j * per * width for j in range(8 // per)]  # first bit of each word within a run
        spans = [(b // 8, -(-(b + per * width) // 8)) for b in starts]
        slots = per
        words = [_words(flat.view(-1, width), spans)]
    field = (1 << id_bits) - 1
    mask = add = carry = 0
    for s in range(slots):
        mask |= field << (s * width)
        add |= ((1 << id_bits) - k) << (s * width)
        carry |= 1 << (s * width + id_bits)
    if len(starts) == 1:
        shifts = bits
    else:
        shifts = torch.tensor([b % 8 + bits for b in starts], dtype=torch.int64, device=packed.device)
    for w in words:
        fields = w.view(-1, len(starts)) >> shifts  # one new tensor, then in place
        fields &= mask
        fields += add
        fields &= carry  # non-negative now: amax is a (much faster) any()
        if int(fields.amax()):
            return False
    return True


def _words(runs: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Bytes ``[a, b)`` of each row of ``runs``, for each span, as little-endian int64 words ``(rows, spans)``."""
    buf = torch.zeros(runs.shape[0], len(spans), 8, dtype=torch.uint8, device=runs.device)
    for j, (a, b) in enumerate(spans):
        buf[:, j, : b - a] = runs[:, a:b]
    return buf.view(torch.int64).view(runs.shape[0], len(spans))
