"""``SplitQuantLinearMethod``: a SplitQuant layer as vLLM parameters, sharded by vLLM's own loaders.

Per vLLM layer (``rows`` = this rank's output rows, ``width`` = this rank's inputs, ``G`` = groups per
row on this rank, 1 for whole-row ranges, ``k = num_clusters``, ``w = symbol_width``), with the names
and contents of :mod:`optimum_splitquant.checkpoint.format`:

=====================  =================================  ==============================================
parameter              shape, dtype                       vLLM class (sharding)
=====================  =================================  ==============================================
``weight_packed``      ``(rows, ceil(width / 8) * w)`` u8  ``PackedvLLMParameter`` (rows; columns in bytes)
``weight_scale``       ``(rows, G, k)`` ``scale_dtype``    ``GroupQuantScaleParameter`` (rows; groups), or
``weight_offset``                                          ``ChannelQuantScaleParameter`` (rows) per row
=====================  =================================  ==============================================

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

After loading, :meth:`SplitQuantLinearMethod.process_weights_after_loading` checks that every part
of the layer got its tensors and that the cluster ids fit ``num_clusters``, and keeps plain tensors.
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

from ..checkpoint.format import OFFSET, PACKED, RANGE_CODES, RANGE_STEPS, SCALE
from ..core.packing import packed_row_bytes
from ..core.ranges import decode_layer_ranges
from ..core.spec import QuantSpec
from ..nn.compact import ids_in_range
from . import compute

__all__ = ["SplitQuantLinearMethod"]

_STATE = "_splitquant"


class _LayerState:
    """What one layer's loaders record: tensors loaded per part, and coded ranges waiting to be decoded."""

    def __init__(self, width: int, full_width: int, groups: int) -> None:
        self.width = width  # inputs on this rank
        self.full_width = full_width
        self.full_groups = groups  # range groups per stored row (all ranks)
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
        state = _LayerState(width, input_size, full_groups)
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
        for part in _parts(layer):
            for name in (PACKED, SCALE, OFFSET):
                if (name, part) in state.loaded or (name, None) in state.loaded:
                    continue
                stored = self.prefix if part is None else f"{self.prefix} (part {part!r})"
                coded = state.coded.get(part, state.coded.get(None, {}))
                if self.spec.range_bits is not None and name != PACKED:
                    missing = [n for n in (RANGE_CODES, RANGE_STEPS) if n not in coded] or [PACKED]
                    name = missing[0]
                raise ValueError(f"SplitQuant layer {stored}: the checkpoint has no {name} for it; it is incomplete")
        for name in (PACKED, SCALE, OFFSET):
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

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        state: _LayerState = getattr(layer, _STATE)
        return compute.linear(
            x, layer.weight_packed, layer.weight_scale, layer.weight_offset, bias, state.width, self.spec
        )


def _parts(layer: torch.nn.Module) -> tuple[Any, ...]:
    """The shard ids vLLM's loaders use for the stored modules fused into ``layer``."""
    if isinstance(layer, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(layer, MergedColumnParallelLinear):
        return tuple(range(len(layer.output_sizes)))
    return (None,)
