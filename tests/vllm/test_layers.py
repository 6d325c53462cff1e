"""vLLM's parallel layers with SplitQuantLinearMethod against the transformers SplitQuantLinear.

Each vLLM layer is built with a faked tensor parallel group (size 1, and size 2 on both ranks), loaded
through its parameters' own ``weight_loader`` as vLLM's model loader does (one call per stored tensor
and shard), and compared with :class:`optimum_splitquant.nn.SplitQuantLinear` holding the same stored
tensors: the dequantized shard is bit-identical to the slice of the reference weight, a forward of 40
tokens (dequantize + GEMM) is bit-identical to ``F.linear`` on that slice, and a single-token forward
(the fused CPU kernel when compiled) is within 1e-5 relative of it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: tests/vllm run in .venv-vllm (bash scripts/install_vllm.sh)")

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers import linear as vllm_linear

from optimum_splitquant.core.spec import COLUMN_SCALE_MIN_ROWS
from optimum_splitquant.hf.config import SplitQuantConfig
from optimum_splitquant.nn import SplitQuantLinear
from optimum_splitquant.nn.compute import dequantize_compact
from optimum_splitquant.vllm.config import SplitQuantVllmConfig
from optimum_splitquant.vllm.method import SplitQuantLinearMethod

from .conftest import tensor_parallel

CONFIGS = {
    "b4-k3-g16": {"bits": 4, "num_clusters": 3, "group_size": 16},
    "b2-k1-row": {"bits": 2, "num_clusters": 1},
    "b8-k16-g32": {"bits": 8, "num_clusters": 16, "group_size": 32},
    "b3-k2-row-coded": {"bits": 3, "num_clusters": 2, "fit": "mse", "range_bits": 5, "range_block": 3},
    "b4-k1-g16-coded": {"bits": 4, "num_clusters": 1, "group_size": 16, "fit": "mse", "range_bits": 6},
}
TP = [(1, 0), (2, 0), (2, 1)]
HIDDEN = 64
HEAD, HEADS, KV_HEADS = 8, 4, 2
PREFIX = "model.layers.0"


def _reference(out_features: int, in_features: int, settings: dict, seed: int) -> SplitQuantLinear:
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        dense.weight[0, :3] = torch.tensor([0.9, -0.8, 0.7])  # outliers: the clusters matter
    return SplitQuantLinear.from_float(dense, SplitQuantConfig(**settings).to_spec())


def _load(layer: nn.Module, stored: nn.Module, shard: object = None) -> None:
    """What vLLM's model loader does with one stored module: each tensor to its parameter's weight_loader."""
    for name, tensor in stored.state_dict().items():
        param = getattr(layer, name)
        if shard is None:
            param.weight_loader(param, tensor)
        else:
            param.weight_loader(param, tensor, shard)


def _finish(layer: nn.Module) -> None:
    layer.quant_method.process_weights_after_loading(layer)


def _dequantized(layer: nn.Module) -> torch.Tensor:
    method: SplitQuantLinearMethod = layer.quant_method
    width = layer.input_size_per_partition
    return dequantize_compact(
        layer.weight_packed, layer.weight_scale, layer.weight_offset, width, method.spec, torch.float32
    )


def _check(layer: nn.Module, reference_weight: torch.Tensor, seed: int) -> None:
    """The layer computes with exactly ``reference_weight`` (this rank's slice of the reference)."""
    assert isinstance(layer.quant_method, SplitQuantLinearMethod)
    torch.testing.assert_close(_dequantized(layer), reference_weight, rtol=0, atol=0)
    torch.manual_seed(seed + 1)
    x = torch.randn(40, reference_weight.shape[1])
    torch.testing.assert_close(layer.quant_method.apply(layer, x), F.linear(x, reference_weight), rtol=0, atol=0)
    one = x[:1]
    torch.testing.assert_close(
        layer.quant_method.apply(layer, one), F.linear(one, reference_weight), rtol=1e-5, atol=1e-6
    )


def _config(settings: dict) -> SplitQuantVllmConfig:
    return SplitQuantVllmConfig.from_config(SplitQuantConfig(**settings).to_dict())


@pytest.mark.parametrize(("tp", "rank"), TP, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_column_parallel(vllm_context: None, name: str, tp: int, rank: int) -> None:
    ref = _reference(48, HIDDEN, CONFIGS[name], seed=1)
    with tensor_parallel(tp, rank):
        layer = vllm_linear.ColumnParallelLinear(
            HIDDEN, 48, bias=False, quant_config=_config(CONFIGS[name]), prefix=f"{PREFIX}.mlp.fc"
        )
        _load(layer, ref)
        _finish(layer)
    rows = 48 // tp
    _check(layer, ref.dequantize_weight()[rank * rows : (rank + 1) * rows], seed=1)


@pytest.mark.parametrize(("tp", "rank"), TP, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_row_parallel(vllm_context: None, name: str, tp: int, rank: int) -> None:
    ref = _reference(24, HIDDEN, CONFIGS[name], seed=2)
    with tensor_parallel(tp, rank):
        layer = vllm_linear.RowParallelLinear(
            HIDDEN, 24, bias=False, quant_config=_config(CONFIGS[name]), prefix=f"{PREFIX}.mlp.down_proj"
        )
        _load(layer, ref)
        _finish(layer)
    width = HIDDEN // tp
    _check(layer, ref.dequantize_weight()[:, rank * width : (rank + 1) * width], seed=2)


def test_row_parallel_ranks_sum_to_the_whole_layer(vllm_context: None) -> None:
    settings = CONFIGS["b4-k3-g16"]
    ref = _reference(24, HIDDEN, settings, seed=3)
    x = torch.randn(5, HIDDEN)
    total = torch.zeros(5, 24)
    for rank in range(2):
        with tensor_parallel(2, rank):
            layer = vllm_linear.RowParallelLinear(HIDDEN, 24, bias=False, quant_config=_config(settings), prefix="p")
            _load(layer, ref)
            _finish(layer)
        total += layer.quant_method.apply(layer, x[:, rank * 32 : (rank + 1) * 32])
    with torch.no_grad():
        torch.testing.assert_close(total, ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("tp", "rank"), TP, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_merged_column_parallel(vllm_context: None, name: str, tp: int, rank: int) -> None:
    sizes = [48, 32]
    refs = [_reference(size, HIDDEN, CONFIGS[name], seed=10 + i) for i, size in enumerate(sizes)]
    config = _config(CONFIGS[name])
    config.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    with tensor_parallel(tp, rank):
        layer = vllm_linear.MergedColumnParallelLinear(
            HIDDEN, sizes, bias=False, quant_config=config, prefix=f"{PREFIX}.mlp.gate_up_proj"
        )
        for shard, ref in reversed(list(enumerate(refs))):  # any order: up before gate
            _load(layer, ref, shard)
        _finish(layer)
    parts = [ref.dequantize_weight() for ref in refs]
    expected = torch.cat([p[rank * (p.shape[0] // tp) : (rank + 1) * (p.shape[0] // tp)] for p in parts])
    _check(layer, expected, seed=4)


@pytest.mark.parametrize(("tp", "rank"), TP, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_qkv_parallel(vllm_context: None, name: str, tp: int, rank: int) -> None:
    refs = {
        "q": _reference(HEADS * HEAD, HIDDEN, CONFIGS[name], seed=20),
        "k": _reference(KV_HEADS * HEAD, HIDDEN, CONFIGS[name], seed=21),
        "v": _reference(KV_HEADS * HEAD, HIDDEN, CONFIGS[name], seed=22),
    }
    config = _config(CONFIGS[name])
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with tensor_parallel(tp, rank):
        layer = vllm_linear.QKVParallelLinear(
            HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, quant_config=config, prefix=f"{PREFIX}.self_attn.qkv_proj"
        )
        for shard in ("v", "q", "k"):
            _load(layer, refs[shard], shard)
        _finish(layer)
    parts = [refs[s].dequantize_weight() for s in ("q", "k", "v")]
    expected = torch.cat([p[rank * (p.shape[0] // tp) : (rank + 1) * (p.shape[0] // tp)] for p in parts])
    _check(layer, expected, seed=5)


def test_row_split_off_the_packing_is_refused(vllm_context: None) -> None:
    settings = {"bits": 4, "num_clusters": 3}
    with (
        tensor_parallel(2, 0),
        pytest.raises(ValueError, match=r"tensor parallel size 2 .* 36 per rank, not a multiple of 8"),
    ):
        vllm_linear.RowParallelLinear(72, 24, bias=False, quant_config=_config(settings), prefix="p")


def test_row_split_off_the_groups_is_refused(vllm_context: None) -> None:
    settings = {"bits": 4, "num_clusters": 3, "group_size": 32}
    with (
        tensor_parallel(2, 0),
        pytest.raises(ValueError, match=r"group_size=32 does not divide the per-rank input width 16"),
    ):
        vllm_linear.RowParallelLinear(32, 24, bias=False, quant_config=_config(settings), prefix="p")


def test_a_missing_tensor_is_an_error(vllm_context: None) -> None:
    settings = CONFIGS["b4-k1-g16-coded"]
    ref = _reference(24, HIDDEN, settings, seed=6)
    with tensor_parallel(1, 0):
        layer = vllm_linear.ColumnParallelLinear(HIDDEN, 24, bias=False, quant_config=_config(settings), prefix="p")
    stored = ref.state_dict()
    for name in ("weight_packed", "weight_range_codes"):
        param = getattr(layer, name)
        param.weight_loader(param, stored[name])
    with pytest.raises(ValueError, match="the checkpoint has no weight_range_steps"):
        _finish(layer)


def test_settings_that_disagree_with_the_tensors_are_an_error(vllm_context: None) -> None:
    ref = _reference(24, HIDDEN, {"bits": 4, "num_clusters": 3}, seed=7)
    with tensor_parallel(1, 0):
        layer = vllm_linear.ColumnParallelLinear(
            HIDDEN, 24, bias=False, quant_config=_config({"bits": 4, "num_clusters": 3, "group_size": 16}), prefix="p"
        )
    with pytest.raises(ValueError, match=r"stored weight_scale has shape \[24, 1, 3\], expected \[rows, 4, 3\]"):
        _load(layer, ref)


def test_layers_left_in_float(vllm_context: None) -> None:
    settings = {"bits": 4, "num_clusters": 3, "modules_to_not_convert": ["lm_head", f"{PREFIX}.mlp.down_proj"]}
    config = _config(settings)
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with tensor_parallel(1, 0):
        linear = vllm_linear.ReplicatedLinear(8, 8)  # any LinearBase: only its kind and prefix matter
    assert isinstance(config.get_quant_method(linear, f"{PREFIX}.mlp.down_proj"), vllm_linear.UnquantizedLinearMethod)
    assert isinstance(config.get_quant_method(linear, f"{PREFIX}.mlp.up_proj"), SplitQuantLinearMethod)
    assert config.get_quant_method(nn.Embedding(4, 4), "model.embed_tokens") is None
    config.quantized_modules = {f"{PREFIX}.self_attn.q_proj", f"{PREFIX}.self_attn.k_proj"}  # as read from headers
    with pytest.raises(ValueError, match=r"v_proj \(float\) into one layer"):
        config.get_quant_method(linear, f"{PREFIX}.self_attn.qkv_proj")
    assert isinstance(config.get_quant_method(linear, f"{PREFIX}.mlp.up_proj"), vllm_linear.UnquantizedLinearMethod)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"config.json quantization_config .*bits must be one of"):
        SplitQuantVllmConfig.from_config({"quant_method": "splitquant", "bits": 9})


# Column scales (format 4) ------------------------------------------------------------------------

COLUMN_SCALED = {
    "budget-b4-g32-coded": {
        "bits": 4,
        "num_clusters": 1,
        "group_size": 32,
        "fit": "mse",
        "range_bits": 6,
        "range_block": 16,
        "column_scales": True,
    },
    "b3-k2-row": {"bits": 3, "num_clusters": 2, "column_scales": True},
}


def _scaled_reference(out_features: int, settings: dict, seed: int) -> SplitQuantLinear:
    """A transformers layer quantized with column scales, from a weight whose columns span two decades."""
    torch.manual_seed(seed)
    dense = nn.Linear(HIDDEN, out_features, bias=False)
    with torch.no_grad():
        dense.weight.mul_(torch.logspace(-1, 1, HIDDEN)[torch.randperm(HIDDEN)])
    ref = SplitQuantLinear.from_float(dense, SplitQuantConfig(**settings).to_spec())
    assert (ref.column_scale() is not None) == (out_features >= COLUMN_SCALE_MIN_ROWS)
    return ref


def _scaled_dequantized(layer: nn.Module) -> torch.Tensor:
    """This rank's weight: each part dequantized times its row of ``weight_column_scale`` (ones when unscaled)."""
    method: SplitQuantLinearMethod = layer.quant_method
    column_scale = getattr(layer, "weight_column_scale", None)
    out, start = [], 0
    for i, rows in enumerate(layer.output_partition_sizes):
        stop = start + rows
        c = None if column_scale is None else column_scale[i]
        out.append(
            dequantize_compact(
                layer.weight_packed[start:stop],
                layer.weight_scale[start:stop],
                layer.weight_offset[start:stop],
                layer.input_size_per_partition,
                method.spec,
                torch.float32,
                column_scale=c,
            )
        )
        start = stop
    return torch.cat(out)


def _rank_rows(tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    rows = tensor.shape[-1] // tp
    return tensor[..., rank * rows : (rank + 1) * rows]


def _check_scaled_column_layer(layer: nn.Module, refs: list[SplitQuantLinear], tp: int, rank: int, seed: int) -> None:
    """A column-parallel or fused layer: this rank's rows of each part's transformers weight and forward."""
    assert isinstance(layer.quant_method, SplitQuantLinearMethod)
    weight = torch.cat([_rank_rows(ref.dequantize_weight().T, tp, rank).T for ref in refs])
    torch.testing.assert_close(_scaled_dequantized(layer), weight, rtol=0, atol=0)
    torch.manual_seed(seed)
    x = torch.randn(40, HIDDEN)
    with torch.no_grad():
        expected = torch.cat([_rank_rows(ref(x), tp, rank) for ref in refs], dim=-1)
        one = torch.cat([_rank_rows(ref(x[:1]), tp, rank) for ref in refs], dim=-1)
    torch.testing.assert_close(layer.quant_method.apply(layer, x), expected, rtol=0, atol=0)
    torch.testing.assert_close(layer.quant_method.apply(layer, x[:1]), one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("tp", "rank"), TP, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(COLUMN_SCALED))
def test_column_scales_column_parallel(vllm_context: None, name: str, tp: int, rank: int) -> None:
    ref = _scaled_reference(48, COLUMN_SCALED[name], seed=30)
    with tensor_parallel(tp, rank):
        layer = vllm_linear.ColumnParallelLinear(
            HIDDEN, 48, bias=False, quant_config=_config(COLUMN_SCALED[name]), prefix=f"{PREFIX}.mlp.fc"
        )
        _load(layer, ref)
        _finish(layer)
    assert layer.weight_column_scale.shape == (1, HIDDEN)
    _check_scaled_column_layer(layer, [ref], tp, rank, seed=31)


@pytest.mark.parametrize(("tp", "rank"), TP, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(COLUMN_SCALED))
def test_column_scales_row_parallel(vllm_context: None, name: str, tp: int, rank: int) -> None:
    ref = _scaled_reference(48, COLUMN_SCALED[name], seed=32)
    with tensor_parallel(tp, rank):
        layer = vllm_linear.RowParallelLinear(
            HIDDEN, 48, bias=False, quant_config=_config(COLUMN_SCALED[name]), prefix=f"{PREFIX}.mlp.down_proj"
        )
        _load(layer, ref)
        _finish(layer)
    width = HIDDEN // tp
    columns = slice(rank * width, (rank + 1) * width)
    torch.testing.assert_close(layer.weight_column_scale[0], ref.column_scale()[columns], rtol=0, atol=0)
    weight = ref.dequantize_weight()[:, columns]
    torch.testing.assert_close(_scaled_dequantized(layer), weight, rtol=0, atol=0)
    torch.manual_seed(33)
    x = torch.randn(40, width)
    torch.testing.assert_close(layer.quant_method.apply(layer, x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(COLUMN_SCALED))
def test_column_scales_row_parallel_ranks_sum_to_the_transformers_layer(vllm_context: None, name: str) -> None:
    ref = _scaled_reference(48, COLUMN_SCALED[name], seed=34)
    torch.manual_seed(35)
    x = torch.randn(5, HIDDEN)
    total = torch.zeros(5, 48)
    for rank in range(2):
        with tensor_parallel(2, rank):
            layer = vllm_linear.RowParallelLinear(
                HIDDEN, 48, bias=False, quant_config=_config(COLUMN_SCALED[name]), prefix="p"
            )
            _load(layer, ref)
            _finish(layer)
        total += layer.quant_method.apply(layer, x[:, rank * 32 : (rank + 1) * 32])
    with torch.no_grad():
        torch.testing.assert_close(total, ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("tp", "rank"), TP, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(COLUMN_SCALED))
def test_column_scales_merged_column_parallel(vllm_context: None, name: str, tp: int, rank: int) -> None:
    refs = [_scaled_reference(size, COLUMN_SCALED[name], seed=40 + i) for i, size in enumerate([48, 32])]
    config = _config(COLUMN_SCALED[name])
    config.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    with tensor_parallel(tp, rank):
        layer = vllm_linear.MergedColumnParallelLinear(
            HIDDEN, [48, 32], bias=False, quant_config=config, prefix=f"{PREFIX}.mlp.gate_up_proj"
        )
        for shard, ref in reversed(list(enumerate(refs))):
            _load(layer, ref, shard)
        _finish(layer)
    assert layer.weight_column_scale.shape == (2, HIDDEN)
    _check_scaled_column_layer(layer, refs, tp, rank, seed=42)


@pytest.mark.parametrize(("tp", "rank"), TP, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(COLUMN_SCALED))
def test_column_scales_qkv_parallel(vllm_context: None, name: str, tp: int, rank: int) -> None:
    """q (32 rows) stores column scales, k and v (16 rows each) store none and run unscaled."""
    refs = {
        "q": _scaled_reference(HEADS * HEAD, COLUMN_SCALED[name], seed=50),
        "k": _scaled_reference(KV_HEADS * HEAD, COLUMN_SCALED[name], seed=51),
        "v": _scaled_reference(KV_HEADS * HEAD, COLUMN_SCALED[name], seed=52),
    }
    config = _config(COLUMN_SCALED[name])
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with tensor_parallel(tp, rank):
        layer = vllm_linear.QKVParallelLinear(
            HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, quant_config=config, prefix=f"{PREFIX}.self_attn.qkv_proj"
        )
        for shard in ("v", "q", "k"):
            _load(layer, refs[shard], shard)
        _finish(layer)
    assert layer.weight_column_scale.shape == (3, HIDDEN)
    assert bool((layer.weight_column_scale[1:] == 1).all())
    _check_scaled_column_layer(layer, [refs[s] for s in ("q", "k", "v")], tp, rank, seed=53)


def test_column_scales_a_fused_layer_without_any_registers_none(vllm_context: None) -> None:
    settings = COLUMN_SCALED["b3-k2-row"]
    refs = [_scaled_reference(size, settings, seed=60 + i) for i, size in enumerate([16, 24])]
    config = _config(settings)
    config.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    with tensor_parallel(1, 0):
        layer = vllm_linear.MergedColumnParallelLinear(
            HIDDEN, [16, 24], bias=False, quant_config=config, prefix=f"{PREFIX}.mlp.gate_up_proj"
        )
        for shard, ref in enumerate(refs):
            _load(layer, ref, shard)
        _finish(layer)
    assert not hasattr(layer, "weight_column_scale")
    _check_scaled_column_layer(layer, refs, 1, 0, seed=62)


def _column_parallel(settings: dict, rows: int = 48) -> nn.Module:
    with tensor_parallel(1, 0):
        return vllm_linear.ColumnParallelLinear(HIDDEN, rows, bias=False, quant_config=_config(settings), prefix="p")


def test_column_scales_a_missing_scale_is_an_error(vllm_context: None) -> None:
    settings = COLUMN_SCALED["b3-k2-row"]
    ref = _scaled_reference(48, settings, seed=70)
    layer = _column_parallel(settings)
    for name, tensor in ref.state_dict().items():
        if name != "weight_column_scale":
            getattr(layer, name).weight_loader(getattr(layer, name), tensor)
    with pytest.raises(ValueError, match="the checkpoint has no weight_column_scale for it"):
        _finish(layer)


@pytest.mark.parametrize(
    ("stored", "match"),
    [
        (torch.ones(HIDDEN // 2, dtype=torch.float16), r"stored weight_column_scale has shape \[32\] and dtype"),
        (torch.ones(HIDDEN, dtype=torch.float32), r"and dtype torch.float32, expected \[64\] and torch.float16"),
    ],
    ids=["shape", "dtype"],
)
def test_column_scales_stored_shape_is_checked(vllm_context: None, stored: torch.Tensor, match: str) -> None:
    layer = _column_parallel(COLUMN_SCALED["b3-k2-row"])
    with pytest.raises(ValueError, match=match):
        layer.weight_column_scale.weight_loader(layer.weight_column_scale, stored)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_column_scales_must_be_finite_and_positive(vllm_context: None, bad: float) -> None:
    settings = COLUMN_SCALED["b3-k2-row"]
    ref = _scaled_reference(48, settings, seed=71)
    stored = ref.state_dict()
    stored["weight_column_scale"][5] = bad
    layer = _column_parallel(settings)
    for name, tensor in stored.items():
        getattr(layer, name).weight_loader(getattr(layer, name), tensor)
    with pytest.raises(ValueError, match="weight_column_scale holds values that are not finite and positive"):
        _finish(layer)


def test_column_scales_for_a_part_that_stores_none_are_an_error(vllm_context: None) -> None:
    settings = COLUMN_SCALED["b3-k2-row"]
    config = _config(settings)
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with tensor_parallel(1, 0):
        layer = vllm_linear.QKVParallelLinear(
            HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, quant_config=config, prefix=f"{PREFIX}.self_attn.qkv_proj"
        )
    param = layer.weight_column_scale
    with pytest.raises(ValueError, match=r"part 'k'\): the checkpoint stores a weight_column_scale for a module of 16"):
        param.weight_loader(param, torch.ones(HIDDEN, dtype=torch.float16), "k")
