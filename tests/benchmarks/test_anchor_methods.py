"""The SINQ and bitsandbytes NF4 anchors of the quality benchmark: method lists, n/a without their libraries, and
(where the libraries are installed, as in ``.venv-anchors``) bits counted from the stored tensors."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from benchmarks import methods


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


def _model() -> nn.Module:
    """Two quantized layers, 256 x 128 and 128 x 256, and a head the benchmark's policy keeps in float."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 2)).eval()


def test_anchor_lists_stay_in_range_with_unique_names():
    sinq, nf4 = methods.sinq_methods(), methods.nf4_methods()
    assert [m.name for m in nf4] == ["NF4 b128", "NF4 b64", "NF4 b32"] and {m.kind for m in nf4} == {"nf4"}
    assert {(m.bits, m.group_size) for m in sinq} >= {(3, 128), (4, 64), (4, 128), (5, 32)}
    assert all(m.kind == "sinq" and m.family == "SINQ" for m in sinq)
    lo, hi = methods.FRONTIER_RANGE
    for m in sinq:
        for w in methods.FRONTIER_WIDTHS:
            assert lo <= methods.sinq_expected_bits(m.bits, m.group_size, w, w) <= hi
    assert methods.select_methods("anchors") == sinq + nf4
    chosen = methods.select_methods("frontier-anchors")
    kinds = {m.kind for m in chosen}
    assert kinds == {"fp32", "splitquant", "hqq", "sinq", "nf4"}
    # every for_budget configuration once, under the name the budget table and paired table look for
    budget_names = set(methods.for_budget_names([3.5, 4, 4.25, 4.5, 5, 6]).values())
    assert budget_names <= {m.name for m in chosen}
    # and among the candidates its table was chosen from
    assert budget_names <= {m.name for m in methods.select_methods("budget-candidates")}


def test_expected_bits_formulas():
    assert methods.nf4_expected_bits(64) == pytest.approx(4.127, abs=1e-3)
    assert methods.nf4_expected_bits(32) == pytest.approx(4 + 0.25 + 32 / 8192)
    # SINQ 4-bit g64 on a 384 x 384 weight: codes, 8-bit scale and zero codes, fp16 rtn8 pairs, fp16 column scale
    groups = 384 * 384 // 64
    expected = 4 + (16 * groups + 32 * groups / 32 + 32 + 16 * 384) / (384 * 384)
    assert methods.sinq_expected_bits(4, 64, 384, 384) == pytest.approx(expected)
    assert methods.sinq_expected_bits(4, 64, 384, 384) == pytest.approx(4.31, abs=0.01)
    # 3-bit codes: ten per int32 word (3.2 bits)
    assert methods.sinq_expected_bits(3, 128, 384, 384) > 3.2 + 16 / 128


@pytest.mark.parametrize("kind", ["sinq", "nf4"])
def test_a_missing_library_makes_the_method_na(monkeypatch, kind):
    module = methods.ANCHOR_LIBRARIES[kind][0]
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    method = next(m for m in methods.anchor_methods() if m.kind == kind)
    reason = methods.unsupported(method, _model())
    assert reason is not None and f"{module} is not installed" in reason and "install_anchors.sh" in reason


def test_sinq_refuses_a_process_patched_at_start(monkeypatch):
    monkeypatch.setenv("SINQ_PTH_LOADED", "1")
    with pytest.raises(RuntimeError, match="SINQ_AUTO_PATCH=0"):
        methods._sinq_quantize(torch.randn(64, 64), 4, 64)


def _apply(method: methods.Method, tmp_path) -> tuple[methods.Applied, nn.Module]:
    fp32 = _model()

    def load() -> nn.Module:
        model = _model()
        model.load_state_dict(fp32.state_dict())
        return model

    assert methods.unsupported(method, fp32) is None
    return methods.apply_method(method, load, tmp_path), fp32


@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_nf4_bits_match_its_stored_tensors(tmp_path, blocksize):
    pytest.importorskip("bitsandbytes")
    applied, fp32 = _apply(methods.Method(f"NF4 b{blocksize}", "bitsandbytes NF4", "nf4", 4, 1, blocksize), tmp_path)
    layers = [m for m in applied.model.modules() if isinstance(m, methods.DequantizingLinear)]
    assert len(layers) == 2
    weights = 2 * 256 * 128
    # codes, absmax codes, a float32 absmax per 256 blocks, and one float32 offset per layer
    per_layer = 256 * 128 * (4 + 8 / blocksize) + 32 * -(-256 * 128 // blocksize // 256) + 32
    assert applied.effective_bits == pytest.approx(2 * per_layer / weights)
    assert applied.effective_bits == pytest.approx(methods.nf4_expected_bits(blocksize), abs=2e-3)
    assert applied.nominal_bits == pytest.approx(methods.nf4_expected_bits(blocksize))
    for layer, ref in zip(layers, (fp32[0], fp32[2]), strict=True):
        assert _sqnr_db(ref.weight, layer._dequantize()) > 18
    x = torch.randn(3, 256)
    with torch.no_grad():  # the forward runs on the dequantized weights (the float head left out: 2 outputs)
        out, ref = applied.model[:4](x), fp32[:4](x)
    assert nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.98


@pytest.mark.parametrize(("nbits", "group"), [(4, 64), (3, 128), (5, 32)])
def test_sinq_bits_match_its_stored_tensors(tmp_path, nbits, group):
    pytest.importorskip("sinq")
    if os.environ.get("SINQ_PTH_LOADED") == "1":
        pytest.skip("SINQ patched transformers at start-up: run the tests with SINQ_AUTO_PATCH=0")
    applied, fp32 = _apply(methods.Method(f"SINQ {nbits}-bit g{group}", "SINQ", "sinq", nbits, 1, group), tmp_path)
    layers = [m for m in applied.model.modules() if isinstance(m, methods.DequantizingLinear)]
    assert len(layers) == 2 and all(layer.column_scale.dtype == torch.float16 for layer in layers)
    expected = sum(
        methods.sinq_expected_bits(nbits, group, m.out_features, m.in_features) * m.weight.numel()
        for m in (fp32[0], fp32[2])
    ) / (2 * 256 * 128)
    assert applied.effective_bits == pytest.approx(expected)
    floor = {3: 12, 4: 18, 5: 24}[nbits]
    for layer, ref in zip(layers, (fp32[0], fp32[2]), strict=True):
        assert layer.column_scale.numel() == ref.in_features
        assert _sqnr_db(ref.weight, layer._dequantize()) > floor
