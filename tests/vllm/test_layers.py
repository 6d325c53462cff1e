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

from optimum_splitquant.hf.config import SplitQuantConfig
from optimum_splitquant.nn import SplitQuantLinear
from optimum_splitquant.nn.compact import dequantize_compact
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
