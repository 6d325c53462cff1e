"""``SplitQuantModule``: the compact tensors of one quantized layer, shared by every layer kind.

The stored tensors (``weight_packed``, ``weight_scale``, ``weight_offset`` and the float
``bias``) are declared, with their shapes and dtypes, in :mod:`optimum_splitquant.checkpoint.format`;
this class allocates exactly those. Every layer kind sees its float weight as a matrix of
``out_features`` rows by ``in_features`` weights (for ``Conv2d`` a row is one flattened output
kernel); a subclass says how its float weight maps onto those rows and how it computes.

While a float checkpoint streams in, the layer also carries a float ``weight`` parameter (usually
on the meta device) that :meth:`SplitQuantModule.quantize_` consumes and deletes.

With coded ranges (``spec.range_bits``, formats 2 and 3) the layer stores ``weight_range_codes`` and
``weight_range_steps`` instead, and holds the scales and offsets they encode as non-persistent
``weight_scale`` / ``weight_offset`` buffers, rebuilt by :meth:`SplitQuantModule.rebuild_ranges_`
(the quantizer calls it once a checkpoint has loaded; ``load_state_dict`` does too).

Optional non-persistent buffer: ``weight_cache`` (float ``(out_features, in_features)``), kept by
:meth:`SplitQuantModule.cache_weight_`.

A layer quantized in this process also records how far its dequantized weight lies from the float
weight it was given (:class:`QuantizationError`, attribute ``quantization_error``; ``None`` for a
layer read from a checkpoint). It is not saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..checkpoint.format import BIAS, OFFSET, PACKED, RANGE_CODES, RANGE_STEPS, SCALE, layer_tensors, stored_tensors
from ..core.packing import unpack_rows
from ..core.quantize import QuantizedWeight, dequantize_weight, quantize_weight
from ..core.ranges import decode_layer_ranges
from ..core.spec import QuantSpec
from ..kernels import triton_ops

__all__ = ["QuantizationError", "SplitQuantModule", "dequantize_compact", "ids_in_range", "validate_layers"]

_CACHE = "weight_cache"

# Rows of the error measurement hold about this many weights: its temporaries (a dequantized chunk and
# its difference to the float chunk) stay small beside the layer's own float weight.
_ERROR_CHUNK_WEIGHTS = 1 << 20


@dataclass(frozen=True)
class QuantizationError:
    """Reconstruction error of one quantized weight, measured when it was quantized.

    Attributes:
        weights: number of weights.
        signal: ``||W||^2``, the squared norm of the float weight.
        noise: ``||W - W_hat||^2``, the squared norm of its difference to the dequantized weight.
    """

    weights: int
    signal: float
    noise: float

    @property
    def relative_noise(self) -> float:
        """``noise / signal`` (0 for an exact reconstruction, a zero weight included)."""
        if self.noise == 0:
            return 0.0
        return self.noise / self.signal if self.signal > 0 else math.inf

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio, ``10 log10(signal / noise)`` dB (``inf`` when exact)."""
        ratio = self.relative_noise
        if ratio == 0:
            return math.inf
        return -10 * math.log10(ratio) if math.isfinite(ratio) else -math.inf


class SplitQuantModule(nn.Module):
    """Base of the quantized layers: compact buffers, quantizing, validation, dequantization, sizes."""

    _weight_noun = "weight"
    quantization_error: QuantizationError | None = None
    """Set by :meth:`quantize_`; ``None`` for a layer read from a checkpoint."""
    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_offset: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        spec: QuantSpec,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        stored = {
            PACKED: torch.uint8,
            SCALE: spec.scale_dtype,
            OFFSET: spec.scale_dtype,
            RANGE_CODES: torch.uint8,
            RANGE_STEPS: spec.scale_dtype,
        }
        # Meta tensors hold no values: empty() there skips zeros()' decomposition (a fifth of a load's rebuild).
        new = torch.empty if torch.device(device or "cpu").type == "meta" else torch.zeros
        for name, layout in layer_tensors(out_features, in_features, spec, bias=False).items():
            self.register_buffer(name, new(layout.shape, dtype=stored[name], device=device))
        # With coded ranges, weight_scale / weight_offset (what the kernels read) are registered when
        # decoded: buffers left on the meta device would cost every load a pass of transformers' own.
        if bias:
            self.bias = nn.Parameter(new(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter(BIAS, None)

    # What a layer kind defines -------------------------------------------------------------------

    @property
    def float_shape(self) -> tuple[int, ...]:
        """Shape of the float weight in the replaced layer's own layout."""
        raise NotImplementedError

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The float weight (in :attr:`float_shape`) as ``(out_features, in_features)`` rows."""
        raise NotImplementedError

    def _from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_rows`."""
        raise NotImplementedError

    # Shared -------------------------------------------------------------------------------------

    def _add_float_placeholder(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        # Set directly: the subclasses' ``weight`` property would shadow a normal registration.
        self._parameters["weight"] = nn.Parameter(
            torch.empty(self.float_shape, device=device, dtype=dtype), requires_grad=False
        )

    @property
    def weight(self) -> torch.Tensor:
        """The float weight in the replaced layer's layout, dequantized on each access (a copy).

        Writing into it changes nothing stored. Before quantization it is the float placeholder.
        """
        placeholder = self._parameters.get("weight")
        if placeholder is not None:
            return placeholder
        return self._from_rows(self.dequantize_weight(self._float_dtype()))

    @property
    def coded(self) -> bool:
        """Whether the ranges are stored as codes (``spec.range_bits``, formats 2 and 3)."""
        return self.spec.range_bits is not None

    def rebuild_ranges_(self) -> None:
        """Rebuild ``weight_scale`` / ``weight_offset`` from the stored range codes (no-op unless coded)."""
        if not self.coded or self.weight_range_codes.is_meta or self.weight_range_steps.is_meta:
            return
        groups = self.spec.num_groups(self.in_features)
        self._set_decoded(
            *decode_layer_ranges(self.weight_range_codes, self.weight_range_steps, self.out_features, groups, self.spec)
        )

    def _set_decoded(self, scale: torch.Tensor, offset: torch.Tensor) -> None:
        self.register_buffer(SCALE, scale, persistent=False)
        self.register_buffer(OFFSET, offset, persistent=False)
        self._ranges_from = self._ranges_source()

    def _ranges_source(self) -> tuple:
        codes, steps = self.weight_range_codes, self.weight_range_steps
        return codes.data_ptr(), codes.device, steps.data_ptr(), steps.dtype

    def _ensure_ranges(self) -> None:
        """Rebuild the decoded ranges if the stored codes were replaced since (an offload hook, a load).

        Skipped while ``torch.compile`` traces (the ranges were decoded when the codes were set).
        """
        if (
            self.coded
            and not torch.compiler.is_compiling()
            and getattr(self, "_ranges_from", None) != self._ranges_source()
        ):
            self.rebuild_ranges_()

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self.rebuild_ranges_()

    @property
    def is_quantized(self) -> bool:
        """False while a float ``weight`` still waits to be quantized."""
        return "weight" not in self._parameters

    def _float_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.float32

    def quantize_(self, weight: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Quantize ``weight`` (in the replaced layer's own layout) into the buffers; drops the float weight.

        ``ids`` (shape ``(out_features, in_features)``) overrides the clustering. Records the
        reconstruction error in :attr:`quantization_error`.
        """
        if tuple(weight.shape) != tuple(self.float_shape):
            raise ValueError(
                f"expected a {self._weight_noun} of shape {tuple(self.float_shape)}, got {tuple(weight.shape)}"
            )
        rows = self._rows(weight.detach())
        q = quantize_weight(rows, self.spec, ids=ids)
        self.quantization_error = _measure_error(rows, q, self.spec)
        del rows
        self.clear_weight_cache_()
        device = weight.device
        self.weight_packed = q.packed.to(device)
        if self.coded:
            self.weight_range_codes = q.range_codes.to(device)
            self.weight_range_steps = q.range_steps.to(device)
            self._set_decoded(q.scale.to(device), q.offset.to(device))
        else:
            self.weight_scale = q.scale.to(device)
            self.weight_offset = q.offset.to(device)
        self._parameters.pop("weight", None)

    def _copy_bias(self, module: nn.Module) -> None:
        bias = getattr(module, "bias", None)
        if bias is not None:
            self.bias.data.copy_(bias.detach())

    def _filled(self, layer: nn.Module, weight: torch.Tensor) -> nn.Module:
        """``layer`` (a new float layer) given ``weight`` and this layer's float bias."""
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def validate(self, dtype: torch.dtype | None = None) -> None:
        """Raise ``ValueError`` if the stored tensors cannot come from a valid quantization.

        Checks that scales and offsets are finite, scales are non-negative, every rebuilt weight is
        finite in ``dtype`` (the compute dtype; default float32, the dtype weights are rebuilt in)
        and every cluster id, padding symbols included, is below ``num_clusters`` (codes cannot
        exceed ``bits`` by construction of the packing). On CPU, one compiled pass over the ranges
        and the packed bytes (``kernels.check_stored``) when the kernels load; otherwise a few
        vectorised torch passes. Never a decode of each weight.
        """
        dtype = dtype or torch.float32
        self._ensure_ranges()
        verdict = _compiled_verdicts([self], dtype)
        verdict = verdict[0] if verdict else None
        if verdict == 1 or (verdict is None and not self._ranges_ok(dtype)):
            self._raise_bad_range(dtype)
        if verdict == 2 or (verdict is None and not ids_in_range(self.weight_packed, self.spec)):
            self._raise_bad_id()

    def _ranges_ok(self, dtype: torch.dtype) -> bool:
        """Scales non-negative, and both ends of every range finite in float32 and in ``dtype``.

        Weights are rebuilt in float32 as ``offset + code * scale`` (codes ``0 .. levels - 1``), so
        the extremes of ``offset`` and ``offset + (levels - 1) * scale`` bound every rebuilt weight.
        Three ``aminmax`` reductions and one cast of six numbers (NaN propagates through them): a
        fraction of the cost of element-wise ``isfinite`` on small tensors.
        """
        if not self.weight_scale.numel():
            return True
        scale, offset = self.weight_scale.float(), self.weight_offset.float()
        high = torch.add(offset, scale, alpha=self.spec.levels - 1)
        ends = torch.stack([*torch.aminmax(scale), *torch.aminmax(offset), *torch.aminmax(high)])
        smallest_scale, *_ = ends.tolist()
        return smallest_scale >= 0 and all(math.isfinite(v) for v in ends.to(dtype).tolist())

    def _raise_bad_range(self, dtype: torch.dtype) -> None:
        """Name what :meth:`_ranges_ok` found (slow path: runs only once something was found)."""
        coded = f" (rebuilt from {RANGE_CODES} and {RANGE_STEPS})" if self.coded else ""
        for name in (SCALE, OFFSET):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"{name}{coded} holds NaN or infinite values")
        if bool((self.weight_scale < 0).any()):
            raise ValueError(f"{SCALE}{coded} holds negative values")
        low = self.weight_offset.float()
        high = low + self.weight_scale.float() * (self.spec.levels - 1)
        largest = float(torch.stack((low, high)).abs().max())
        raise ValueError(
            f"{SCALE} and {OFFSET}{coded} rebuild weights of magnitude up to {largest:.6g}, which overflow {dtype} "
            f"(largest finite value {torch.finfo(dtype).max:.6g}); the values are damaged, or the model needs a "
            "wider compute dtype: load it with dtype=torch.float32"
        )

    def _raise_bad_id(self) -> None:
        """Name the largest cluster id (slow path: runs only once a bad id was found)."""
        packed, spec = self.weight_packed, self.spec
        count = packed.shape[1] * 8 // spec.symbol_width  # every symbol of a row, padding included
        ids = unpack_rows(packed, spec.symbol_width, count) >> spec.bits
        top = int(ids[:, : self.in_features].max()) if self.in_features else 0
        if top >= spec.num_clusters:
            raise ValueError(
                f"{PACKED} holds cluster id {top}, but num_clusters={spec.num_clusters}: "
                "the codes do not match the declared settings"
            )
        raise ValueError(
            f"{PACKED} holds cluster id {int(ids.max())} in the padding after a row's last weight "
            f"(num_clusters={spec.num_clusters}; a writer pads rows with zero symbols): the tensor is damaged"
        )

    def quantized_weight(self) -> QuantizedWeight:
        """The compact tensors (with coded ranges: the decoded scales and offsets, and the codes)."""
        self._ensure_ranges()
        if self.coded:
            return QuantizedWeight(
                self.weight_packed,
                self.weight_scale,
                self.weight_offset,
                self.in_features,
                self.weight_range_codes,
                self.weight_range_steps,
            )
        return QuantizedWeight(self.weight_packed, self.weight_scale, self.weight_offset, self.in_features)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out_features, in_features)`` float weight this layer computes with (a new tensor)."""
        cache = self._buffers.get(_CACHE)
        if cache is not None:
            return cache.to(dtype, copy=True)
        return self._dequantize_packed(dtype)

    def _dequantize_packed(self, dtype: torch.dtype) -> torch.Tensor:
        self._ensure_ranges()
        return dequantize_compact(
            self.weight_packed, self.weight_scale, self.weight_offset, self.in_features, self.spec, dtype
        )

    def _check_quantized(self) -> None:
        if not self.is_quantized:
            raise RuntimeError(
                f"{type(self).__name__} was never given its weight: call quantize_() or load a checkpoint"
            )

    def cache_weight_(self, dtype: torch.dtype | None = None) -> int:
        """Opt-in speed: keep the dequantized weight in memory; returns the bytes it costs.

        The cache is a non-persistent buffer (never saved, counted by ``get_memory_footprint``,
        cast by ``model.to(dtype)``); ``dtype`` defaults to the bias dtype or fp32.
        """
        if not self.is_quantized:
            raise RuntimeError("cannot cache the weight of a layer that was never quantized")
        if dtype is None:
            dtype = self._float_dtype()
        self.clear_weight_cache_()
        w = self._dequantize_packed(dtype)
        self.register_buffer(_CACHE, w, persistent=False)
        return w.numel() * w.element_size()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # ``model.to(dtype)`` also casts the scales; rebuild the cache so it stays the dequantized weight.
        result = super()._apply(fn, recurse)
        self.rebuild_ranges_()  # from the (cast) steps, as a reload of a save of the cast model would
        cache = self._buffers.get(_CACHE)
        if cache is not None:
            self._buffers[_CACHE] = self._dequantize_packed(cache.dtype).to(cache.device)
        return result

    def clear_weight_cache_(self) -> None:
        """Drop the dequantized weight kept by :meth:`cache_weight_` (no-op without one)."""
        self._buffers.pop(_CACHE, None)

    def storage_bits(self) -> int:
        """Bits stored for the weight: packed codes and ids, scales and offsets or their codes (bias excluded)."""
        tensors = [getattr(self, name) for name in stored_tensors(self.spec)]
        return sum(t.numel() * t.element_size() * 8 for t in tensors)

    def effective_bits(self) -> float:
        """Stored weight bits divided by the number of original weights."""
        n = self.in_features * self.out_features
        return self.storage_bits() / n if n else 0.0

    def _settings_repr(self) -> str:
        s = self.spec
        group = "row" if s.group_size is None else s.group_size
        coded = "" if s.range_bits is None else f", range_bits={s.range_bits}, range_block={s.range_block}"
        return f"bits={s.bits}, num_clusters={s.num_clusters}, group={group}, clustering={s.clustering}{coded}"


def dequantize_compact(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    in_features: int,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``(rows, in_features)`` float weight of compact tensors: the fastest path of their device."""
    if packed.device.type == "cuda" and triton_ops.available():
        return triton_ops.dequantize(packed, scale, offset, in_features, spec.bits, spec.symbol_width, dtype)
    if packed.device.type == "cpu" and kernels.available():
        w = kernels.dequantize(packed, scale, offset, in_features, spec.bits, spec.symbol_width)
        return w if dtype == torch.float32 else w.to(dtype)
    return dequantize_weight(packed, scale, offset, in_features, spec, dtype)


def _measure_error(rows: torch.Tensor, q: QuantizedWeight, spec: QuantSpec) -> QuantizationError:
    """:class:`QuantizationError` of float ``rows`` ``(out, in)`` against their quantized form ``q``.

    Dequantized a chunk of rows at a time (:data:`_ERROR_CHUNK_WEIGHTS`): no full-size float copy of
    the layer beside the one the caller holds, and no difference tensor (``torch.dist``). Norms per
    chunk in float32, their squares summed in float64.
    """
    out_f, in_f = rows.shape
    signal = noise = 0.0
    step = max(1, _ERROR_CHUNK_WEIGHTS // max(in_f, 1))
    with torch.no_grad():
        for r0 in range(0, out_f if in_f else 0, step):
            w = rows[r0 : r0 + step].float()
            rebuilt = dequantize_compact(
                q.packed[r0 : r0 + step], q.scale[r0 : r0 + step], q.offset[r0 : r0 + step], in_f, spec
            )
            signal += float(torch.linalg.vector_norm(w)) ** 2
            noise += float(torch.dist(rebuilt, w)) ** 2
    return QuantizationError(out_f * in_f, signal, noise)


def enable_weight_cache(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Cache the dequantized weight of every SplitQuant layer in ``model``; returns the bytes added.

    Trades memory for speed: the cached layers run a plain float op (no dequantization) and hold
    ``out * in`` floats each again, as much as the float model's weights.
    """
    return sum(m.cache_weight_(dtype) for m in model.modules() if isinstance(m, SplitQuantModule) and m.is_quantized)


def disable_weight_cache(model: nn.Module) -> None:
    """Drop every cache added by :func:`enable_weight_cache`."""
    for m in model.modules():
        if isinstance(m, SplitQuantModule):
            m.clear_weight_cache_()


def validate_layers(layers: dict[str, SplitQuantModule], dtype: torch.dtype | None = None) -> None:
    """:meth:`SplitQuantModule.validate` of every layer; the ``ValueError`` starts with the layer's name.

    The CPU layers are checked in one compiled call when the kernels load (a model's worth in a few
    milliseconds); a layer found bad, and any other layer, go through ``validate()`` itself.
    """
    dtype = dtype or torch.float32
    for layer in layers.values():
        layer._ensure_ranges()
    on_cpu = [name for name, layer in layers.items() if layer.weight_packed.device.type == "cpu"]
    verdicts = dict(zip(on_cpu, _compiled_verdicts([layers[n] for n in on_cpu], dtype) or [], strict=False))
    for name, layer in layers.items():
        if verdicts.get(name) == 0:
            continue
        try:
            layer.validate(dtype)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None


def _compiled_verdicts(layers: list[SplitQuantModule], dtype: torch.dtype) -> list[int] | None:
    """``kernels.check_stored`` of CPU ``layers`` (0 valid, 1 bad range, 2 bad cluster id), or None."""
    if not layers or any(layer.weight_packed.device.type != "cpu" for layer in layers):
        return None
    buffers = [layer._buffers for layer in layers]
    specs = [layer.spec for layer in layers]
    return kernels.check_stored(
        [b[PACKED] for b in buffers],
        [b[SCALE] for b in buffers],
        [b[OFFSET] for b in buffers],
        [spec.bits for spec in specs],
        [spec.symbol_width for spec in specs],
        [spec.num_clusters for spec in specs],
        dtype,
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
