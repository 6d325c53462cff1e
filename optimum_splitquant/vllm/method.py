"""``SplitQuantLinearMethod``: a SplitQuant layer as vLLM parameters, sharded by vLLM's own loaders.

Per vLLM layer (``rows`` = this rank's output rows, ``width`` = this rank's inputs, ``G`` = groups per
row on this rank, 1 for whole-row ranges, ``k = num_clusters``, ``w = symbol_width``), with the names
and contents of :mod:`optimum_splitquant.checkpoint.format`:

=========================  =================================  ==============================================
parameter                  shape, dtype                       vLLM class (sharding)
=========================  =================================  ==============================================
``weight_packed``          ``(rows, ceil(width / 8) * w)`` u8  ``PackedvLLMParameter`` (rows; columns in bytes)
``weight_scale``           ``(rows, G, k)`` ``scale_dtype``    ``GroupQuantScaleParameter`` (rows; groups), or
``weight_offset``                                              ``ChannelQuantScaleParameter`` (rows) per row
``weight_column_scale``    ``(parts, width)`` ``scale_dtype``  ``BasevLLMParameter``, own loader (columns)
=========================  =================================  ==============================================

A packed row holds the symbols of one output row, so column-parallel and fused layers (``qkv_proj``,
``gate_up_proj``, whose parts vLLM's loaders place one after the other) slice whole rows. A
row-parallel layer splits each row: its per-rank width must be a multiple of 8 (eight symbols fill
``w`` whole bytes) and of ``group_size``; :meth:`SplitQuantLinearMethod.create_weights` refuses
other splits, naming the tensor parallel size. Whole-row ranges are the same on every rank.

Coded ranges (``range_bits``): ``weight_range_codes`` / ``weight_range_steps`` form one stream over
the (row, group, cluster) lines of a stored module, in blocks of ``range_block`` lines that cross
rows, so they cannot be cut per rank. Their loaders keep each stored module's whole (small) tensors
until the module's codes, steps and packed rows have arrived, decode them with the core functions
(:func:`~optimum_splitquant.core.ranges.decode_layer_ranges`), and hand the decoded full ``(rows, G,
k)`` ranges to vLLM's loader of ``weight_scale`` / ``weight_offset``, which shards them like stored
ones: every tensor parallel size that suits the packed rows suits coded ranges too.

Column scales (format 4, ``column_scales``): each stored module of at least
:data:`~optimum_splitquant.core.spec.COLUMN_SCALE_MIN_ROWS` rows holds its own ``(in,)`` scale ``c``
and its weight is ``deq(W') * c[None, :]``. A fused layer's parts share their inputs but not their
scales, so ``weight_column_scale`` holds one row per part (``parts`` = 3 for ``qkv_proj``, 2 for
``gate_up_proj``, else 1; a part of fewer rows, such as a small ``k_proj``, keeps a row of ones and
runs unscaled), and the forward runs each scaled part on its own rows
(:func:`~optimum_splitquant.nn.linear_compact` with its ``c``, as the transformers layer of that
module does) and concatenates the outputs; adjacent unscaled parts run together. The parameter is
registered only when some part stores scales (vLLM requires every registered tensor to be loaded).
Its loader takes the whole stored ``(in,)`` tensor and keeps this rank's columns: all of them for
column-parallel and fused layers, the rank's slice for row-parallel ones.

After loading, :meth:`SplitQuantLinearMethod.process_weights_after_loading` checks that every part
of the layer got its tensors (column scales for the parts that store them), that the cluster ids fit
``num_clusters`` and that the column scales are finite and positive, and keeps plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from ..checkpoint.format import COLUMN_SCALE, OFFSET, PACKED, RANGE_CODES, RANGE_STEPS, SCALE
from ..core.packing import packed_row_bytes
from ..core.ranges import decode_layer_ranges
from ..core.spec import COLUMN_SCALE_MIN_ROWS, QuantSpec
from ..nn.validation import ids_in_range
from . import compute

__all__ = ["SplitQuantLinearMethod"]

_STATE = "_splitquant"


class _LayerState:
    """A layer's geometry, and what its loaders record: tensors loaded per part, coded ranges waiting to be decoded.

    ``parts`` are the shard ids of the stored modules fused into the layer (``(None,)`` when not fused),
    ``stored_rows`` their rows in the checkpoint, ``scaled`` which of them store column scales, and
    ``runs`` the ``(start, stop, part index or None)`` row spans on this rank the forward computes
    separately (a part with column scales alone, adjacent unscaled parts together, index ``None``).
    """

    def __init__(
        self,
        width: int,
        full_width: int,
        groups: int,
        parts: tuple[Any, ...],
        stored_rows: tuple[int, ...],
        scaled: tuple[bool, ...],
        runs: tuple[tuple[int, int, int | None], ...],
    ) -> None:
        self.width = width  # inputs on this rank
        self.full_width = full_width
        self.full_groups = groups  # range groups per stored row (all ranks)
        self.parts = parts
        self.stored_rows = stored_rows
        self.scaled = scaled
        self.runs = runs
        self.loaded: set[tuple[str, Any]] = set()
        self.coded: dict[Any, dict[str, Any]] = {}  # part -> {RANGE_CODES, RANGE_STEPS, "rows"}


@register_weight_loader_v2_supported_method
class SplitQuantLinearMethod(LinearMethodBase):
    """vLLM linear method of SplitQuant layers (see the module docstring)."""

    def __init__(self, spec: QuantSpec, prefix: str = "") -> None:
        self.spec = spec
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        spec = self.spec
        rows, width = sum(output_partition_sizes), input_size_per_partition
        full_groups = self._groups(input_size, input_size, "the layer's input width")
        if width != input_size:  # row-parallel: each rank holds a slice of every row
            self._check_row_split(width, input_size)
        groups = self._groups(width, input_size, "the per-rank input width")
        loader = extra_weight_attrs["weight_loader"]
        parts, stored_rows = _parts(layer), _stored_rows(layer, output_size)
        scaled = tuple(spec.has_column_scales(r) for r in stored_rows)
        runs = self._runs(output_partition_sizes, scaled)
        state = _LayerState(width, input_size, full_groups, parts, stored_rows, scaled, runs)
        setattr(layer, _STATE, state)

        packed = PackedvLLMParameter(
            data=torch.empty(rows, packed_row_bytes(width, spec.symbol_width), dtype=torch.uint8),
            input_dim=1,
            output_dim=0,
            packed_dim=1,
            packed_factor=Fraction(8, spec.symbol_width),
            weight_loader=self._recording(layer, PACKED, loader),
        )
        layer.register_parameter(PACKED, packed)
        for name in (SCALE, OFFSET):
            data = torch.empty(rows, groups, spec.num_clusters, dtype=spec.scale_dtype)
            recording = self._recording(layer, name, loader)
            if spec.group_size is None:  # one range per whole row: the same on every rank of a row split
                param = ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=recording)
            else:
                param = GroupQuantScaleParameter(data=data, output_dim=0, input_dim=1, weight_loader=recording)
            layer.register_parameter(name, param)
        if spec.range_bits is not None:
            for name, dtype in ((RANGE_CODES, torch.uint8), (RANGE_STEPS, spec.scale_dtype)):
                holder = BasevLLMParameter(data=torch.empty(0, dtype=dtype), weight_loader=self._coded(layer, name))
                layer.register_parameter(name, holder)
        if any(scaled):
            ones = torch.ones(len(parts), width, dtype=spec.scale_dtype)  # an unscaled part multiplies by 1
            column_scale = BasevLLMParameter(data=ones, weight_loader=self._column_scale(layer))
            layer.register_parameter(COLUMN_SCALE, column_scale)

    # Checks ---------------------------------------------------------------------------------------

    def _groups(self, width: int, full_width: int, what: str) -> int:
        group = self.spec.group_size
        if group is None:
            return 1
        if width % group:
            raise ValueError(
                f"SplitQuant layer {self.prefix!r}: group_size={group} does not divide {what} {width} "
                f"(of {full_width} inputs); use a tensor parallel size that leaves whole groups on every rank"
            )
        return width // group

    def _runs(self, partition_sizes: list[int], scaled: tuple[bool, ...]) -> tuple[tuple[int, int, int | None], ...]:
        """Row spans of this rank the forward computes apart: each scaled part, and runs of unscaled ones."""
        if len(partition_sizes) != len(scaled):
            if any(scaled):
                raise ValueError(
                    f"SplitQuant layer {self.prefix!r}: vLLM fuses {len(partition_sizes)} stored modules into it in a "
                    "way this plugin cannot apply column scales to; quantize the model without column_scales"
                )
            return ((0, sum(partition_sizes), None),)
        runs: list[tuple[int, int, int | None]] = []
        start = 0
        for index, (size, has_scale) in enumerate(zip(partition_sizes, scaled, strict=True)):
            stop = start + size
            if not has_scale and runs and runs[-1][2] is None:
                runs[-1] = (runs[-1][0], stop, None)
            else:
                runs.append((start, stop, index if has_scale else None))
            start = stop
        return tuple(runs)

    def _check_row_split(self, width: int, full_width: int) -> None:
        tp = full_width // width
        if width % 8:
            raise ValueError(
                f"SplitQuant layer {self.prefix!r}: tensor parallel size {tp} splits its {full_width} inputs into "
                f"{width} per rank, not a multiple of 8 (8 packed symbols fill {self.spec.symbol_width} whole bytes); "
                "the packed rows cannot be cut there: use a smaller tensor parallel size"
            )

    def _check_stored(self, state: _LayerState, name: str, loaded: torch.Tensor) -> None:
        """The stored tensor's per-row shape matches the settings (rows are checked by vLLM's loaders)."""
        spec = self.spec
        want: tuple[int, ...] | None = None
        if name == PACKED:
            want = (packed_row_bytes(state.full_width, spec.symbol_width),)
        elif name in (SCALE, OFFSET):
            want = (state.full_groups, spec.num_clusters)
        if want is not None and tuple(loaded.shape[1:]) != want:
            raise ValueError(
                f"SplitQuant layer {self.prefix!r}: stored {name} has shape {list(loaded.shape)}, expected "
                f"[rows, {', '.join(map(str, want))}] for {state.full_width} inputs with bits={spec.bits}, "
                f"num_clusters={spec.num_clusters}, group_size={spec.group_size}; config.json and the weights disagree"
            )

    # Loaders --------------------------------------------------------------------------------------

    def _recording(self, layer: torch.nn.Module, name: str, loader: Callable[..., None]) -> Callable[..., None]:
        """``loader`` (vLLM's, which shards), after checking the stored shape and noting what was loaded."""

        def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            state: _LayerState = getattr(layer, _STATE)
            self._check_stored(state, name, loaded)
            if shard_id is None:
                loader(param, loaded)
            else:
                loader(param, loaded, shard_id)
            state.loaded.add((name, shard_id))
            if name == PACKED and self.spec.range_bits is not None:
                self._stash(layer, shard_id, "rows", loaded.shape[0])

        return load

    def _column_scale(self, layer: torch.nn.Module) -> Callable[..., None]:
        """Loader of one stored module's ``(in,)`` column scale: into its part's row, this rank's columns only."""

        def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            state: _LayerState = getattr(layer, _STATE)
            stored = self.prefix if shard_id is None else f"{self.prefix} (part {shard_id!r})"
            if shard_id not in state.parts:
                raise ValueError(
                    f"SplitQuant layer {stored}: the checkpoint stores a {COLUMN_SCALE} for a module that is not one "
                    f"of its parts {list(state.parts)}; the checkpoint does not match the model"
                )
            index = state.parts.index(shard_id)
            if not state.scaled[index]:
                raise ValueError(
                    f"SplitQuant layer {stored}: the checkpoint stores a {COLUMN_SCALE} for a module of "
                    f"{state.stored_rows[index]} rows, which stores none (fewer than {COLUMN_SCALE_MIN_ROWS}); "
                    "config.json and the weights disagree"
                )
            if tuple(loaded.shape) != (state.full_width,) or loaded.dtype != self.spec.scale_dtype:
                raise ValueError(
                    f"SplitQuant layer {stored}: stored {COLUMN_SCALE} has shape {list(loaded.shape)} and dtype "
                    f"{loaded.dtype}, expected [{state.full_width}] and {self.spec.scale_dtype} (scale_dtype) for "
                    f"{state.full_width} inputs; config.json and the weights disagree"
                )
            start = layer.tp_rank * state.width if state.width != state.full_width else 0
            param.data[index].copy_(loaded[start : start + state.width])
            state.loaded.add((COLUMN_SCALE, shard_id))

        return load

    def _coded(self, layer: torch.nn.Module, name: str) -> Callable[..., None]:
        def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            self._stash(layer, shard_id, name, loaded.detach().clone())

        return load

    def _stash(self, layer: torch.nn.Module, part: Any, key: str, value: Any) -> None:
        """Keep one piece of a stored module's coded ranges; decode them once codes, steps and rows are in."""
        state: _LayerState = getattr(layer, _STATE)
        pending = state.coded.setdefault(part, {})
        pending[key] = value
        if not {RANGE_CODES, RANGE_STEPS, "rows"} <= pending.keys():
            return
        rows = pending["rows"]
        scale, offset = decode_layer_ranges(
            pending[RANGE_CODES], pending[RANGE_STEPS], rows, state.full_groups, self.spec
        )
        del state.coded[part]
        for tensor_name, value_ in ((SCALE, scale), (OFFSET, offset)):
            param = getattr(layer, tensor_name)
            param.weight_loader(param, value_, part)

    # After loading, forward -----------------------------------------------------------------------

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        state: _LayerState = getattr(layer, _STATE)
        for part, has_scale in zip(state.parts, state.scaled, strict=True):
            for name in (PACKED, SCALE, OFFSET, *((COLUMN_SCALE,) if has_scale else ())):
                if (name, part) in state.loaded or (name, None) in state.loaded:
                    continue
                stored = self.prefix if part is None else f"{self.prefix} (part {part!r})"
                coded = state.coded.get(part, state.coded.get(None, {}))
                if self.spec.range_bits is not None and name in (SCALE, OFFSET):
                    missing = [n for n in (RANGE_CODES, RANGE_STEPS) if n not in coded] or [PACKED]
                    name = missing[0]
                raise ValueError(f"SplitQuant layer {stored}: the checkpoint has no {name} for it; it is incomplete")
        for name in (PACKED, SCALE, OFFSET, COLUMN_SCALE):
            if not hasattr(layer, name):
                continue
            data = getattr(layer, name).data.contiguous()
            delattr(layer, name)
            layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
        for name in (RANGE_CODES, RANGE_STEPS):
            if hasattr(layer, name):
                delattr(layer, name)
        state.coded.clear()
        if not ids_in_range(layer.weight_packed, self.spec):
            raise ValueError(
                f"SplitQuant layer {self.prefix!r}: {PACKED} holds cluster ids >= num_clusters="
                f"{self.spec.num_clusters}; the codes do not match config.json's settings"
            )
        for name in (SCALE, OFFSET):
            if not bool(torch.isfinite(getattr(layer, name)).all()):
                raise ValueError(f"SplitQuant layer {self.prefix!r}: {name} holds NaN or infinite values")
        column_scale = getattr(layer, COLUMN_SCALE, None)
        if column_scale is not None and not bool((torch.isfinite(column_scale) & (column_scale > 0)).all()):
            raise ValueError(
                f"SplitQuant layer {self.prefix!r}: {COLUMN_SCALE} holds values that are not finite and positive; "
                "the checkpoint is damaged"
            )

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        state: _LayerState = getattr(layer, _STATE)
        packed, scale, offset = layer.weight_packed, layer.weight_scale, layer.weight_offset
        column_scale = getattr(layer, COLUMN_SCALE, None)
        if len(state.runs) == 1:
            index = state.runs[0][2]
            c = None if index is None else column_scale[index]
            return compute.linear(x, packed, scale, offset, bias, state.width, self.spec, column_scale=c)
        outputs = [
            compute.linear(
                x,
                packed[start:stop],
                scale[start:stop],
                offset[start:stop],
                None if bias is None else bias[start:stop],
                state.width,
                self.spec,
                column_scale=None if index is None else column_scale[index],
            )
            for start, stop, index in state.runs
        ]
        return torch.cat(outputs, dim=-1)


def _parts(layer: torch.nn.Module) -> tuple[Any, ...]:
    """The shard ids vLLM's loaders use for the stored modules fused into ``layer``."""
    if isinstance(layer, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(layer, MergedColumnParallelLinear):
        return tuple(range(len(layer.output_sizes)))
    return (None,)


def _stored_rows(layer: torch.nn.Module, output_size: int) -> tuple[int, ...]:
    """The rows in the checkpoint of each stored module fused into ``layer`` (all ranks; ``_parts``' order)."""
    if isinstance(layer, QKVParallelLinear):
        kv = layer.total_num_kv_heads
        return (layer.total_num_heads * layer.head_size, kv * layer.head_size, kv * layer.v_head_size)
    if isinstance(layer, MergedColumnParallelLinear):
        return tuple(layer.output_sizes)
    return (output_size,)
