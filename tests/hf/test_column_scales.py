"""Column scales (format 4) through transformers: save / reload, what is stored, damaged files, dtypes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import VOCAB
from torch import nn
from transformers import AutoModelForCausalLM

import optimum_splitquant  # noqa: F401  (registers the quantizer with transformers)
from optimum_splitquant import SplitQuantConfig
from optimum_splitquant.checkpoint.format import COLUMN_SCALE, METADATA_FORMAT_KEY, METADATA_SETTINGS_KEY
from optimum_splitquant.core.spec import COLUMN_SCALE_MIN_ROWS
from optimum_splitquant.layers import dequantize_model
from optimum_splitquant.nn import SplitQuantModule

CONFIG = SplitQuantConfig.for_budget(4.5)  # INT4, groups of 32, coded ranges, column scales


def _layers(model: nn.Module) -> dict[str, SplitQuantModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SplitQuantModule)}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def uneven_dir(tiny_dirs, tmp_path_factory) -> Path:
    """The tiny Llama with input columns of uneven magnitudes (as trained weights have)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama-lm"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.mul_(torch.exp(0.5 * torch.randn(module.in_features, generator=gen)))
    out = tmp_path_factory.mktemp("uneven")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def saved(uneven_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(uneven_dir, quantization_config=CONFIG).eval()
    out = tmp_path_factory.mktemp("column-scales")
    model.save_pretrained(out)
    return model, out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, edit, metadata: dict | None = None) -> None:
    path = str(folder / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={**meta, **(metadata or {})})


def test_config_is_format_4_with_column_scales():
    assert CONFIG.column_scales and CONFIG.format_version == 4


def test_save_and_reload_is_exact(saved, input_ids):
    model, out = saved
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(again, input_ids), _logits(model, input_ids))
    twins = _layers(again)
    for name, layer in _layers(model).items():
        a, b = layer.column_scale(), twins[name].column_scale()
        assert (a is None) == (b is None) == (layer.out_features < COLUMN_SCALE_MIN_ROWS), name
        assert a is None or torch.equal(a, b), name


def test_layers_store_column_scales_and_compute_with_them(saved, input_ids, uneven_dir):
    model, out = saved
    tensors = load_file(str(out / "model.safetensors"))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta[METADATA_FORMAT_KEY] == "4" and json.loads(meta[METADATA_SETTINGS_KEY])["column_scales"] is True
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format_version"] == 4
    layers = _layers(model)
    scaled = [n for n, m in layers.items() if m.column_scale() is not None]
    assert scaled and len(scaled) < len(layers)  # k_proj / v_proj have 16 rows: none
    assert any(not torch.equal(layers[n].column_scale(), torch.ones_like(layers[n].column_scale())) for n in scaled)
    for name, layer in layers.items():
        key = f"{name}.{COLUMN_SCALE}"
        assert (key in tensors) == (name in scaled), key
        if key in tensors:
            assert tensors[key].shape == (layer.in_features,) and tensors[key].dtype == torch.float16
    # The forward uses the scales: it equals the dequantized float model's (fp32 summation order aside).
    float_twin = dequantize_model(AutoModelForCausalLM.from_pretrained(out).eval())
    torch.testing.assert_close(_logits(model, input_ids), _logits(float_twin, input_ids), rtol=1e-4, atol=1e-4)
    reference = AutoModelForCausalLM.from_pretrained(uneven_dir).eval()
    err = (_logits(model, input_ids) - _logits(reference, input_ids)).norm() / _logits(reference, input_ids).norm()
    assert err < 0.1


def test_half_precision_forward_takes_the_scaled_weight(saved, input_ids):
    model, out = saved
    half = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    torch.testing.assert_close(_logits(half, input_ids).float(), _logits(model, input_ids), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, float("inf")], ids=["nan", "zero", "negative", "inf"])
def test_bad_column_scales_are_refused(saved, tmp_path, bad):
    _, out = saved
    folder = _copy(out, tmp_path / "bad")
    key = f"model.layers.0.self_attn.q_proj.{COLUMN_SCALE}"

    def damage(tensors):
        tensors[key][3] = bad

    _rewrite(folder, damage)
    with pytest.raises(ValueError, match=COLUMN_SCALE):
        AutoModelForCausalLM.from_pretrained(folder)


def test_missing_column_scales_are_refused(saved, tmp_path):
    _, out = saved
    folder = _copy(out, tmp_path / "missing")
    _rewrite(folder, lambda t: t.pop(f"model.layers.1.mlp.gate_proj.{COLUMN_SCALE}"))
    with pytest.raises(ValueError, match=COLUMN_SCALE):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_format_3_header_is_refused_for_a_column_scale_config(saved, tmp_path):
    _, out = saved
    folder = _copy(out, tmp_path / "v3")
    _rewrite(folder, lambda t: None, {METADATA_FORMAT_KEY: "3"})
    with pytest.raises(ValueError, match="format"):
        AutoModelForCausalLM.from_pretrained(folder)
