"""SplitQuantConfig: validation with actionable messages, JSON round trip, registration."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, BertConfig, PreTrainedModel
from transformers.quantizers.auto import AutoQuantizationConfig

from optimum_splitquant import FORMAT_VERSION, SplitQuantConfig
from optimum_splitquant.core import QuantSpec
from optimum_splitquant.hf.config import BUDGET_WIDTH
from optimum_splitquant.nn import SplitQuantLinear


def test_defaults_and_spec():
    cfg = SplitQuantConfig(bits=2)
    assert (cfg.bits, cfg.num_clusters, cfg.group_size, cfg.clustering) == (2, 3, None, "tensor")
    # Without coded ranges the oldest format that stores it (1, which every release reads) is written.
    assert cfg.format_version == 1 and cfg.quant_method == "splitquant"
    assert SplitQuantConfig(bits=4, fit="mse", range_bits=6).format_version == 3
    assert SplitQuantConfig(bits=4, column_scales=True).format_version == FORMAT_VERSION == 4
    spec = cfg.to_spec()
    assert spec.symbol_width == 4 and spec.scale_dtype == torch.float16


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=2),
        dict(bits=8, num_clusters=1, group_size=64, clustering="channel", scale_dtype="float32"),
        dict(bits=3, modules_to_not_convert=["classifier", "pooler.dense"], scale_dtype="bfloat16"),
        dict(bits=4, num_clusters=1, group_size=32, fit="mse", range_bits=6, range_block=16, column_scales=True),
    ],
    ids=["int2-defaults", "int8-plain-grouped", "int3-skips", "int4-coded-column-scales"],
)
def test_json_round_trip(kwargs):
    cfg = SplitQuantConfig(**kwargs)
    text = cfg.to_json_string()
    again = AutoQuantizationConfig.from_dict(json.loads(text))
    assert isinstance(again, SplitQuantConfig)
    assert again == cfg and again.to_dict() == json.loads(text)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (None, None),
        ([], []),
        (["lm_head", "classifier"], ["lm_head", "classifier"]),
        (("a", "b"), ["a", "b"]),
        ({"pooler.dense", "classifier"}, ["classifier", "pooler.dense"]),
        (frozenset({"a"}), ["a"]),
    ],
    ids=["none", "empty", "list", "tuple", "set-sorted", "frozenset"],
)
def test_modules_to_not_convert_is_stored_as_a_list(given, stored):
    cfg = SplitQuantConfig(modules_to_not_convert=given)
    assert cfg.modules_to_not_convert == stored
    again = AutoQuantizationConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg and again.modules_to_not_convert == stored


def test_round_trip_through_config_json(tmp_path):
    model_cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model_cfg.quantization_config = SplitQuantConfig(bits=4, group_size=32)
    model_cfg.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored == SplitQuantConfig(bits=4, group_size=32).to_dict()
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert AutoQuantizationConfig.from_dict(loaded.quantization_config) == SplitQuantConfig(bits=4, group_size=32)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(bits=0), ValueError, r"bits must be one of \(2, 3, 4, 5, 6, 7, 8\), got 0"),
        (dict(bits=1), ValueError, r"bits must be one of .*got 1"),
        (dict(bits=9), ValueError, r"bits must be one of .*got 9"),
        (dict(bits="two"), TypeError, r"bits must be .*got 'two'"),
        (dict(bits=None), TypeError, r"bits must be .*got None"),
        (dict(bits=2.0), TypeError, r"bits must be .*got 2.0"),
        (dict(bits=True), TypeError, r"bits must be .*got True"),
        (dict(num_clusters=0), ValueError, r"num_clusters must be an integer in \[1, 16\], got 0"),
        (dict(num_clusters=1000), ValueError, r"num_clusters must be .*got 1000"),
        (dict(group_size=0), ValueError, r"group_size must be None or a positive integer, got 0"),
        (dict(group_size="64"), TypeError, r"group_size must be .*got '64'"),
        (dict(clustering="row"), ValueError, r"clustering must be one of \('tensor', 'channel'\), got 'row'"),
        (dict(scale_dtype="int8"), ValueError, r"scale_dtype must be one of .*got 'int8'"),
        (dict(modules_to_not_convert="lm_head"), TypeError, r"must be None or a list .*'lm_head': write \['lm_head'\]"),
        (dict(modules_to_not_convert={"a": 1}), TypeError, r"modules_to_not_convert must be .*got dict \{'a': 1\}"),
        (dict(modules_to_not_convert=range(2)), TypeError, r"modules_to_not_convert .*got range range\(0, 2\)"),
        (dict(modules_to_not_convert=5), TypeError, r"modules_to_not_convert .*got int 5"),
        (dict(modules_to_not_convert=["a", 1]), TypeError, r"modules_to_not_convert .*not names: \[1\]"),
        (dict(format_version=5), ValueError, r"format_version 5 was written by a newer optimum-splitquant"),
        (dict(column_scales=True, format_version=3), ValueError, r"column_scales=True needs format_version >= 4"),
        (dict(column_scales="yes"), TypeError, r"column_scales must be True or False, got 'yes'"),
        (dict(format_version=0), ValueError, r"format_version must be >= 1"),
        (dict(quant_method="gptq"), ValueError, r"quant_method must be 'splitquant', got 'gptq'"),
        (dict(bitz=2), TypeError, r"unknown field\(s\) \['bitz'\]"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}" for k in v),
)
def test_bad_values_name_the_field(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        SplitQuantConfig(**kwargs)


def test_unknown_key_in_saved_config_is_refused():
    data = SplitQuantConfig(bits=2).to_dict()
    data["future_option"] = True
    with pytest.raises(TypeError, match="future_option"):
        AutoQuantizationConfig.from_dict(data)


@pytest.mark.parametrize("budget", [3.5, 4.0, 4.25, 4.5, 5.0, 6.0, 8.0])
def test_for_budget_stays_within_the_budget_on_typical_widths(budget):
    config = SplitQuantConfig.for_budget(budget)
    spec = config.to_spec()
    for width in (512, 576, 768, 1024, 1536, 2048, 4096, 11008):
        if spec.group_size is None or width % spec.group_size == 0:
            for rows in (512, width, 4 * width):
                assert spec.bits_per_weight(width, rows) <= budget, (budget, width, rows, config.to_dict())
    assert SplitQuantConfig.from_dict(config.to_dict()) == config


def test_for_budget_gives_more_bits_to_larger_budgets_and_takes_overrides():
    sizes = [SplitQuantConfig.for_budget(b).to_spec().bits_per_weight(512) for b in (3.5, 4.25, 5.0, 6.0)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    kept = SplitQuantConfig.for_budget(4.25, modules_to_not_convert=["classifier"])
    assert kept.modules_to_not_convert == ["classifier"]


@pytest.mark.parametrize("budget", [3.5, 4.0, 4.25, 4.5, 5.0, 6.0])
@pytest.mark.parametrize("loaded", [False, True], ids=["quantized", "loaded"])
def test_for_budget_holds_in_memory_what_it_stores(budget: float, loaded: bool) -> None:
    # get_memory_footprint counts parameters and buffers: coded ranges stay coded, nothing decoded is kept.
    spec = SplitQuantConfig.for_budget(budget).to_spec()
    torch.manual_seed(0)
    layer = SplitQuantLinear.from_float(nn.Linear(BUDGET_WIDTH, BUDGET_WIDTH, bias=False), spec)
    if loaded:
        again = SplitQuantLinear(BUDGET_WIDTH, BUDGET_WIDTH, bias=False, spec=spec)
        again.load_state_dict(layer.state_dict())
        layer = again
    layer(torch.randn(2, BUDGET_WIDTH))  # a forward pass caches nothing either
    in_memory = PreTrainedModel.get_memory_footprint(layer) * 8 / BUDGET_WIDTH**2
    assert layer.effective_bits() <= budget
    assert in_memory <= layer.effective_bits() + 0.1, (budget, in_memory, layer.effective_bits())


@pytest.mark.parametrize(
    ("value", "error"), [(3.0, ValueError), (float("nan"), ValueError), ("4", TypeError), (True, TypeError)]
)
def test_for_budget_refuses_what_it_cannot_meet(value, error):
    with pytest.raises(error, match=r"bits per weight|bits_per_weight"):
        SplitQuantConfig.for_budget(value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": "4"},
        {"bits": 9},
        {"num_clusters": 0},
        {"group_size": 2.0},
        {"fit": "mle"},
        {"range_bits": 3, "fit": "mse"},
        {"column_scales": 1},
    ],
    ids=lambda kw: ",".join(f"{a}={b}" for a, b in kw.items()),
)
def test_config_and_spec_refuse_alike(kwargs: dict) -> None:
    """One validation: the config raises what the spec raises, with the same message."""
    with pytest.raises((TypeError, ValueError)) as from_spec:
        QuantSpec(**{"bits": 4, **kwargs})
    with pytest.raises((TypeError, ValueError)) as from_config:
        SplitQuantConfig(**kwargs)
    assert type(from_config.value) is type(from_spec.value)
    assert str(from_config.value) == str(from_spec.value)
