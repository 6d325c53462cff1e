"""Coded ranges through transformers: save / reload, format version, sizes, damaged files, config, casting."""

from __future__ import annotations

import json
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
from optimum_splitquant.checkpoint.format import (
    METADATA_FORMAT_KEY,
    METADATA_SETTINGS_KEY,
    OFFSET,
    PACKED,
    RANGE_CODES,
    RANGE_STEPS,
    SCALE,
)
from optimum_splitquant.core import QuantSpec, unpack_rows
from optimum_splitquant.core.ranges import decode_ranges, unpack_range_codes
from optimum_splitquant.nn import SplitQuantModule
from optimum_splitquant.nn.linear import SplitQuantLinear

CODED = dict(bits=4, num_clusters=1, group_size=16, fit="mse", range_bits=6)
CODED_TENSOR_NAMES = (PACKED, RANGE_CODES, RANGE_STEPS)


def _layers(model: nn.Module) -> dict[str, SplitQuantModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SplitQuantModule)}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = str(Path(folder) / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    return load_file(path), meta


def _rewrite(folder: Path, edit) -> None:
    """Apply ``edit(tensors)`` to ``folder/model.safetensors``, keeping its header metadata."""
    tensors, meta = _tensors(folder)
    edit(tensors)
    save_file(tensors, str(Path(folder) / "model.safetensors"), metadata=meta)


def _decoded(codes: torch.Tensor, steps: torch.Tensor, lines: int, spec: QuantSpec):
    """Scales and offsets ``(lines, k)`` of stored codes and steps, from the documented formula alone.

    Products rounded to the stored ``scale_dtype``, then held in the steps' dtype (where a model was cast).
    """
    k, r = spec.num_clusters, spec.range_bits
    symbols = unpack_rows(codes.reshape(1, -1), r, 2 * lines * k).reshape(2, lines, k).float()
    zero = 1 << (r - 1) if spec.signed_offsets else 0  # format 3: signed offset codes
    per_line = steps.float()[torch.arange(lines) // spec.range_block]  # (lines, 2, k)
    scale = (symbols[0] * per_line[:, 0]).to(spec.scale_dtype).to(steps.dtype)
    return scale, ((symbols[1] - zero) * per_line[:, 1]).to(spec.scale_dtype).to(steps.dtype)


@pytest.fixture(scope="module")
def float_dir(tiny_dirs) -> Path:
    return Path(tiny_dirs["llama-lm"])


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def coded(float_dir, tmp_path_factory):
    """The float model quantized on load with coded ranges, and the folder it was saved to."""
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=SplitQuantConfig(**CODED)).eval()
    out = tmp_path_factory.mktemp("coded")
    model.save_pretrained(out)
    return model, out


def _load(path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_save_and_reload_is_exact(coded, input_ids):
    model, out = coded
    layers = _layers(model)
    assert len(layers) == 14, sorted(layers)  # 7 linear layers per decoder layer; lm_head stays float
    again = _load(out)
    assert torch.equal(_logits(again, input_ids), _logits(model, input_ids))
    reloaded = _layers(again)
    assert set(reloaded) == set(layers)
    for name, layer in layers.items():
        twin = reloaded[name]
        assert twin.coded and twin.spec == layer.spec
        for buf in CODED_TENSOR_NAMES:
            a, b = getattr(layer, buf), getattr(twin, buf)
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}.{buf}"
        for buf, a, b in zip((SCALE, OFFSET), layer.ranges(), twin.ranges(), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}.{buf}"
        assert torch.equal(layer.bias, twin.bias) if layer.bias is not None else twin.bias is None


def test_checkpoint_stores_codes_instead_of_ranges(coded):
    model, out = coded
    tensors, meta = _tensors(out)
    assert meta[METADATA_FORMAT_KEY] == "3"
    settings = json.loads(meta[METADATA_SETTINGS_KEY])
    assert settings["range_bits"] == 6 and settings["range_block"] == 8
    for name, layer in _layers(model).items():
        for tensor in CODED_TENSOR_NAMES:
            assert f"{name}.{tensor}" in tensors, f"{name}.{tensor}"
        for tensor in (SCALE, OFFSET, "weight"):
            assert f"{name}.{tensor}" not in tensors, f"{name}.{tensor}"
        lines = layer.out_features * (layer.in_features // 16)
        assert tensors[f"{name}.{RANGE_CODES}"].shape == (-(-2 * lines // 8) * 6,)
        assert tensors[f"{name}.{RANGE_STEPS}"].shape == (-(-lines // 8), 2, 1)
        assert tensors[f"{name}.{RANGE_STEPS}"].dtype == torch.float16
        # The ranges the layer computes with are the ones the stored codes give.
        scale, offset = _decoded(tensors[f"{name}.{RANGE_CODES}"], tensors[f"{name}.{RANGE_STEPS}"], lines, layer.spec)
        assert torch.equal(layer.ranges()[0].reshape(lines, 1), scale)
        assert torch.equal(layer.ranges()[1].reshape(lines, 1), offset)
    assert not any(key.endswith((f".{SCALE}", f".{OFFSET}")) for key in tensors)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["range_bits"] == 6 and saved["range_block"] == 8 and saved["format_version"] == 3
    assert saved["fit"] == "mse" and saved["quant_method"] == "splitquant"


def test_uncoded_config_still_writes_version_1(float_dir, tmp_path, input_ids):
    cfg = SplitQuantConfig(bits=4, num_clusters=1, group_size=16, fit="mse")
    assert cfg.format_version == 1 and cfg.range_bits is None
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg).eval()
    model.save_pretrained(tmp_path)
    tensors, meta = _tensors(tmp_path)
    assert meta[METADATA_FORMAT_KEY] == "1"
    assert "range_bits" not in json.loads(meta[METADATA_SETTINGS_KEY])
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == 1 and saved["range_bits"] is None
    layers = _layers(model)
    assert layers and not any(layer.coded for layer in layers.values())
    for name in layers:
        assert {f"{name}.{t}" for t in (PACKED, SCALE, OFFSET)} <= set(tensors)
        assert f"{name}.{RANGE_CODES}" not in tensors and f"{name}.{RANGE_STEPS}" not in tensors
    assert torch.equal(_logits(_load(tmp_path), input_ids), _logits(model, input_ids))


def test_storage_bits_count_the_stored_bytes(coded):
    model, out = coded
    tensors, _ = _tensors(out)
    for name, layer in _layers(model).items():
        stored = sum(tensors[f"{name}.{t}"].nbytes for t in CODED_TENSOR_NAMES)
        assert layer.storage_bits() == 8 * stored, name
        assert layer.effective_bits() == 8 * stored / (layer.in_features * layer.out_features)
        # The decoded ranges are held in memory, not stored: with them the layer would cost more.
        assert layer.storage_bits() < 8 * (tensors[f"{name}.{PACKED}"].nbytes + 2 * layer.ranges()[0].nbytes)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def test_nan_steps_are_refused(coded, tmp_path):
    _, out = coded
    folder = _copy(out, tmp_path / "damaged")
    key = f"model.layers.1.mlp.down_proj.{RANGE_STEPS}"

    def damage(tensors):
        assert key in tensors
        tensors[key] = torch.full_like(tensors[key], float("nan"))

    _rewrite(folder, damage)
    with pytest.raises(ValueError, match=f"{RANGE_STEPS}|rebuilt from {RANGE_CODES}"):
        _load(folder)


def test_wrong_shaped_codes_are_refused(coded, tmp_path):
    _, out = coded
    folder = _copy(out, tmp_path / "damaged")
    key = f"model.layers.0.self_attn.q_proj.{RANGE_CODES}"

    def damage(tensors):
        tensors[key] = tensors[key][:-1].clone()

    _rewrite(folder, damage)
    with pytest.raises(ValueError, match=RANGE_CODES):
        _load(folder)


def test_config_validation_and_round_trip():
    cfg = SplitQuantConfig(**CODED)
    assert cfg.format_version == 3 and cfg.range_block == 8 and cfg.to_spec().signed_offsets
    assert cfg.to_spec().range_bits == 6 and cfg.to_spec().range_block == 8
    again = SplitQuantConfig(**cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert SplitQuantConfig(**json.loads(cfg.to_json_string())) == cfg
    blocked = SplitQuantConfig(**{**CODED, "range_block": 3, "format_version": 2})
    assert SplitQuantConfig(**blocked.to_dict()).range_block == 3
    with pytest.raises(ValueError, match="fit='mse'"):
        SplitQuantConfig(**{**CODED, "fit": "minmax"})
    with pytest.raises(ValueError, match="format_version"):
        SplitQuantConfig(**CODED, format_version=1)
    for bad in (3, 9, 0):
        with pytest.raises(ValueError, match="range_bits"):
            SplitQuantConfig(**{**CODED, "range_bits": bad})
    with pytest.raises(ValueError, match="range_block"):
        SplitQuantConfig(**CODED, range_block=0)


def _linear_pair(spec: QuantSpec) -> tuple[SplitQuantLinear, SplitQuantLinear]:
    torch.manual_seed(1)
    src = SplitQuantLinear.from_float(nn.Linear(64, 40), spec)
    return src, SplitQuantLinear(64, 40, True, spec=spec)


def test_load_state_dict_rebuilds_the_ranges():
    spec = QuantSpec(bits=4, num_clusters=2, group_size=16, fit="mse", range_bits=5, range_block=3)
    src, dst = _linear_pair(spec)
    state = src.state_dict()
    assert set(state) == {PACKED, RANGE_CODES, RANGE_STEPS, "bias"}  # decoded ranges are not persistent
    assert not bool(src.ranges()[0].eq(0).all())
    dst.load_state_dict(state)
    assert torch.equal(dst.ranges()[0], src.ranges()[0])
    assert torch.equal(dst.ranges()[1], src.ranges()[1])
    lines = 40 * 4
    scale, offset = _decoded(dst.weight_range_codes, dst.weight_range_steps, lines, spec)
    assert torch.equal(dst.ranges()[0].reshape(lines, 2), scale)
    assert torch.equal(dst.ranges()[1].reshape(lines, 2), offset)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_cast_to_bfloat16_rebuilds_from_cast_steps():
    spec = QuantSpec(bits=4, num_clusters=2, group_size=16, fit="mse", range_bits=5, range_block=3)
    src, dst = _linear_pair(spec)
    dst.load_state_dict(src.state_dict())
    model = nn.Sequential(dst)
    model.to(torch.bfloat16)
    assert dst.weight_range_steps.dtype == torch.bfloat16
    assert dst.weight_range_codes.dtype == torch.uint8
    assert torch.equal(dst.weight_range_codes, src.weight_range_codes)
    assert torch.equal(dst.weight_range_steps, src.weight_range_steps.to(torch.bfloat16))
    lines = 40 * 4
    scale, offset = _decoded(dst.weight_range_codes, dst.weight_range_steps, lines, spec)
    assert scale.dtype == torch.bfloat16
    assert dst.ranges()[0].dtype == dst.ranges()[1].dtype == torch.bfloat16
    assert torch.equal(dst.ranges()[0].reshape(lines, 2), scale)
    assert torch.equal(dst.ranges()[1].reshape(lines, 2), offset)
    coded = unpack_range_codes(dst.weight_range_codes, dst.weight_range_steps, lines, spec)
    assert torch.equal(decode_ranges(coded, spec)[0].to(torch.bfloat16), scale)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x.to(torch.bfloat16))
        reference = src(x)
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    # bf16 steps, weights and activations: close to the fp16 layer, not equal (8 significant bits).
    assert float((y.float() - reference).abs().max()) <= 0.05 * float(reference.abs().max())


def test_cast_model_to_bfloat16_runs(coded, input_ids):
    _, out = coded
    model = _load(out)
    expected = _logits(model, input_ids)
    model.to(torch.bfloat16)
    for name, layer in _layers(model).items():
        assert layer.weight_range_steps.dtype == torch.bfloat16, name
        lines = layer.ranges()[0].shape[0] * layer.ranges()[0].shape[1]
        scale, offset = _decoded(layer.weight_range_codes, layer.weight_range_steps, lines, layer.spec)
        assert torch.equal(layer.ranges()[0].reshape(lines, 1), scale), name
        assert torch.equal(layer.ranges()[1].reshape(lines, 1), offset), name
    logits = _logits(model, input_ids)
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
    assert float((logits.float() - expected).abs().max()) <= 0.1 * float(expected.abs().max())


def test_cast_to_float32_keeps_every_weight(coded):
    _, out = coded
    model = _load(out)
    layers = _layers(model)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    model.to(torch.float16).to(torch.float32)  # fp16 steps survive the round trip exactly
    for name, layer in layers.items():
        assert layer.weight_range_steps.dtype == torch.float32, name
        assert torch.equal(layer.weight.detach(), before[name]), name


def test_format_2_is_written_and_read_as_before(float_dir, tmp_path, input_ids):
    cfg = SplitQuantConfig(**CODED, format_version=2)
    assert not cfg.to_spec().signed_offsets
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg).eval()
    out = tmp_path / "v2"
    model.save_pretrained(out)
    tensors, meta = _tensors(out)
    assert meta[METADATA_FORMAT_KEY] == "2"
    for name, layer in _layers(model).items():  # unsigned offset codes times a signed step
        lines = layer.out_features * (layer.in_features // 16)
        scale, offset = _decoded(tensors[f"{name}.{RANGE_CODES}"], tensors[f"{name}.{RANGE_STEPS}"], lines, layer.spec)
        assert torch.equal(layer.ranges()[0].reshape(lines, 1), scale), name
        assert torch.equal(layer.ranges()[1].reshape(lines, 1), offset), name
    again = _load(out)
    assert torch.equal(_logits(again, input_ids), _logits(model, input_ids))

    # A config.json that claims format 3 for these weights would read their offsets wrongly: refused.
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"written in format 2 but config\.json says format_version 3"):
        _load(out)


def test_range_block_is_bounded_and_a_long_block_is_one_block(float_dir):
    with pytest.raises(ValueError, match=r"range_block must be an integer in \[1, 65536\]"):
        SplitQuantConfig.for_budget(4.5, range_block=10**12)
    with pytest.raises(TypeError, match="range_block"):
        SplitQuantConfig(**CODED, range_block="8")
    cfg = SplitQuantConfig(**CODED, range_block=65536)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg)
    for name, layer in _layers(model).items():
        assert layer.weight_range_steps.shape == (1, 2, 1), name


def test_size_report_counts_coded_ranges_once():
    from optimum_splitquant.report import size_report

    spec = QuantSpec(bits=4, num_clusters=1, group_size=32, fit="mse", range_bits=6)
    model = nn.Sequential(SplitQuantLinear.from_float(nn.Linear(256, 64, bias=False), spec))
    report = size_report(model)
    assert report.quantized_bytes * 8 == model[0].storage_bits()  # codes, range codes and steps
    assert report.other_bytes == 0  # not the range codes and steps again, nor the decoded ranges
    assert report.effective_bits == 4.5
