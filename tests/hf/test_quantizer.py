"""The transformers face: on-the-fly quantization, save / push / reload, pipelines, device_map, dtype."""

from __future__ import annotations

import copy
import importlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import TINY, load, quantized_layers, rewrite_weights, run
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline
from transformers.pytorch_utils import Conv1D

import optimum_splitquant
from optimum_splitquant import SplitQuantConfig, size_report
from optimum_splitquant.checkpoint.format import LAYER_TENSORS, METADATA_FORMAT_KEY
from optimum_splitquant.hf.quantizer import LayerTensors, SplitQuantHfQuantizer

HEADS = {"bert-base": "pooler.dense", "bert-seqcls": "classifier", "gpt2-lm": "lm_head", "llama-lm": "lm_head"}

CODED = dict(bits=4, num_clusters=1, group_size=16, fit="mse", range_bits=6)
"""Settings with coded ranges (format 2)."""


def float_layers(model):
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


@pytest.mark.parametrize("name", list(TINY))
def test_on_the_fly_replaces_layers_and_keeps_head(name, tiny_dirs, sample_inputs):
    cfg = SplitQuantConfig(bits=2)
    model = load(name, tiny_dirs[name], quantization_config=cfg)
    layers = quantized_layers(model)
    assert layers, "no layer was quantized"
    head = HEADS[name]
    assert head not in layers and head in float_layers(model)
    assert model.config.quantization_config.modules_to_not_convert == [head]
    assert cfg.modules_to_not_convert is None, "the caller's config object must not be mutated"
    for layer in layers.values():
        assert layer.is_quantized and layer.weight_packed.dtype == torch.uint8
        assert "weight" not in dict(layer.named_parameters())
    # The quantized model computes exactly what its dequantized float twin computes.
    out = run(model, sample_inputs)
    assert torch.isfinite(out).all()
    twin = model.dequantize()
    assert not quantized_layers(twin) and not getattr(twin, "is_quantized", False)
    torch.testing.assert_close(run(twin, sample_inputs), out, rtol=0, atol=0)


def test_gpt2_conv1d_layers_are_quantized(tiny_dirs):
    model = load("gpt2-lm", tiny_dirs["gpt2-lm"], quantization_config=SplitQuantConfig(bits=4))
    sources = {m.source for m in quantized_layers(model).values()}
    assert sources == {"conv1d"}
    twin = model.dequantize()
    assert isinstance(twin.transformer.h[0].attn.c_attn, Conv1D)


# A fresh process costs ~9 s here; the in-process reload tests cover every architecture by default, and
# tests/hf/test_autoload.py reloads bit for bit in a fresh process that never imports the package.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert-seqcls", "gpt2-lm", "llama-lm"])
def test_save_reload_in_fresh_process_bit_identical(name, tiny_dirs, sample_inputs, tmp_path):
    model = load(name, tiny_dirs[name], quantization_config=SplitQuantConfig(bits=3, group_size=16))
    expected = run(model, sample_inputs)
    out_dir = tmp_path / "q"
    model.save_pretrained(out_dir)
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata()[METADATA_FORMAT_KEY] == "1"
        names = f.keys()
        assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in quantized_layers(model) for k in names)
    saved = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "splitquant" and saved["bits"] == 3 and saved["format_version"] == 1
    inputs_file = tmp_path / "inputs.safetensors"
    save_file({k: v.contiguous() for k, v in sample_inputs.items()}, str(inputs_file))
    result_file = tmp_path / "out.safetensors"
    auto = TINY[name][0].__name__
    script = textwrap.dedent(
        f"""
        import torch, optimum_splitquant
        from safetensors.torch import load_file, save_file
        from transformers import {auto}
        model = {auto}.from_pretrained({str(out_dir)!r}).eval()
        inputs = load_file({str(inputs_file)!r})
        if "bert" not in type(model).__name__.lower():
            inputs.pop("token_type_ids", None)
        with torch.no_grad():
            out = model(**inputs)
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        save_file({{"out": out.contiguous()}}, {str(result_file)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={"HF_HUB_OFFLINE": "1", **_env()})
    assert torch.equal(load_file(str(result_file))["out"], expected)


def _env():
    import os

    return {k: v for k, v in os.environ.items()}


def test_sharded_save_reloads_identically(tiny_dirs, sample_inputs, tmp_path):
    model = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=2))
    model.save_pretrained(tmp_path, max_shard_size="500KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1, shards
    again = load("llama-lm", tmp_path)
    assert torch.equal(run(again, sample_inputs), run(model, sample_inputs))


@pytest.mark.parametrize(
    ("dtype", "settings"),
    [(None, dict(bits=2)), (torch.bfloat16, dict(bits=2)), (torch.bfloat16, CODED)],
    ids=["fp32", "bf16", "coded-bf16"],
)
def test_a_reloaded_checkpoint_saves_the_same_tensors(tiny_dirs, tmp_path, dtype, settings):
    """Loading groups each layer's tensors in one conversion; saving reverses it into the same file."""
    model = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(**settings))
    model.save_pretrained(tmp_path / "first")
    again = load("llama-lm", tmp_path / "first", dtype=dtype)
    for layer in quantized_layers(again).values():
        assert (layer.weight_packed.dtype, layer.ranges()[0].dtype) == (torch.uint8, torch.float16)
    again.save_pretrained(tmp_path / "second")
    first, second = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("first", "second"))
    quantized = [k for k in first if k.endswith(LAYER_TENSORS)]
    assert quantized and set(first) == set(second)
    for key in quantized:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """The tiny Llama, one layer wide enough for every ``for_budget`` group size (128 inputs, 256 in the MLP)."""
    auto, make_config = TINY["llama-lm"]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide_llama")
    auto.from_config(make_config(hidden_size=128, intermediate_size=256, num_hidden_layers=1)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("budget", [3.5, 4.0, 4.25, 4.5, 5.0, 6.0])
def test_every_for_budget_configuration_reloads_bit_identically(budget, wide_llama, sample_inputs, tmp_path):
    model = load("llama-lm", wide_llama, quantization_config=SplitQuantConfig.for_budget(budget))
    assert quantized_layers(model)
    model.save_pretrained(tmp_path)
    again = load("llama-lm", tmp_path)
    assert again.config.quantization_config == model.config.quantization_config
    assert torch.equal(run(again, sample_inputs), run(model, sample_inputs))


def test_a_copied_layer_conversion_collects_on_its_own():
    """transformers deep-copies the conversion per checkpoint key: copies share no mutable state."""
    (template,) = SplitQuantHfQuantizer(SplitQuantConfig(bits=2), pre_quantized=True).get_weight_conversions()
    first, second = copy.deepcopy(template), copy.deepcopy(template)
    first.collected_tensors["weight_packed"].append("future")
    first.layer_targets["a.weight_packed"].add("a.weight_packed")
    for conv in (template, second):
        assert not conv.collected_tensors and not conv.layer_targets
    assert first.source_patterns == template.source_patterns and first.source_patterns is not template.source_patterns
    assert first.compiled_sources.pattern == template.compiled_sources.pattern
    assert [type(op) for op in first.operations] == [LayerTensors] and first.operations[0] is not template.operations[0]
    assert first.operations is not template.operations


@pytest.mark.parametrize(
    ("offload_buffers", "settings"),
    [(False, dict(bits=4)), (True, dict(bits=4)), (False, CODED), (True, CODED)],
    ids=["weights", "buffers-too", "coded-weights", "coded-buffers-too"],
)
def test_reload_with_a_layer_offloaded_to_disk(tiny_dirs, sample_inputs, tmp_path, offload_buffers, settings):
    """Coded ranges: the offloaded layer's decoded ranges are rebuilt from the codes the hook brings in."""
    model = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(**settings))
    model.save_pretrained(tmp_path / "q")
    on_cpu = ("model.embed_tokens", "model.layers.0", "model.norm", "model.rotary_emb", "lm_head")
    device_map = {**dict.fromkeys(on_cpu, "cpu"), "model.layers.1": "disk"}
    again = load(
        "llama-lm",
        tmp_path / "q",
        device_map=device_map,
        offload_folder=str(tmp_path / "offload"),
        offload_buffers=offload_buffers,
    )
    assert torch.equal(run(again, sample_inputs), run(model, sample_inputs))


def test_reload_ignores_a_different_config_argument(tiny_dirs, sample_inputs, tmp_path):
    model = load("bert-seqcls", tiny_dirs["bert-seqcls"], quantization_config=SplitQuantConfig(bits=2))
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="quantization_config"):
        again = load("bert-seqcls", tmp_path, quantization_config=SplitQuantConfig(bits=8))
    assert again.config.quantization_config.bits == 2
    assert torch.equal(run(again, sample_inputs), run(model, sample_inputs))


class _FakeHubApi:
    """Stands in for huggingface_hub.HfApi: records what push_to_hub would upload."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        return type("Repo", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            self.files[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return None


def test_push_to_hub_uploads_a_reloadable_checkpoint(tiny_dirs, sample_inputs, tmp_path, monkeypatch):
    import transformers.utils.hub as hub
    from huggingface_hub.errors import EntryNotFoundError

    fake = _FakeHubApi()
    monkeypatch.setattr(hub, "_hf_api", fake)

    def no_card(*args, **kwargs):
        raise EntryNotFoundError("no model card")

    monkeypatch.setattr(hub.ModelCard, "load", no_card)
    model = load("bert-seqcls", tiny_dirs["bert-seqcls"], quantization_config=SplitQuantConfig(bits=2))
    model.push_to_hub("me/tiny-splitquant-int2")
    assert {"config.json", "model.safetensors"} <= set(fake.files)
    for rel, data in fake.files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    again = load("bert-seqcls", tmp_path)
    assert quantized_layers(again).keys() == quantized_layers(model).keys()
    assert torch.equal(run(again, sample_inputs), run(model, sample_inputs))


def test_text_classification_pipeline(tiny_dirs, tokenizer, tmp_path):
    model = load("bert-seqcls", tiny_dirs["bert-seqcls"], quantization_config=SplitQuantConfig(bits=2))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    in_memory = pipeline("text-classification", model=model, tokenizer=tokenizer)("win a free prize now")
    from_dir = pipeline("text-classification", model=str(tmp_path))("win a free prize now")
    assert in_memory[0]["label"] in {"LABEL_0", "LABEL_1"}
    assert in_memory[0]["label"] == from_dir[0]["label"]
    assert in_memory[0]["score"] == pytest.approx(from_dir[0]["score"], abs=1e-6)


def test_feature_extraction_pipeline(tiny_dirs, tokenizer):
    model = load("bert-base", tiny_dirs["bert-base"], quantization_config=SplitQuantConfig(bits=4))
    feats = torch.tensor(pipeline("feature-extraction", model=model, tokenizer=tokenizer)("hello world")[0])
    assert feats.shape[-1] == 32 and torch.isfinite(feats).all()


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm"])
def test_text_generation_pipeline_matches_generate(name, tiny_dirs, tokenizer):
    model = load(name, tiny_dirs[name], quantization_config=SplitQuantConfig(bits=4))
    gen = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = gen("the weather today", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("the weather today")
    ids = tokenizer("the weather today", return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_device_map_auto_on_cpu(tiny_dirs, sample_inputs, tmp_path):
    model = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=2), device_map="auto")
    expected = run(model, sample_inputs)
    ref = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=2))
    assert torch.equal(run(ref, sample_inputs), expected)
    model.save_pretrained(tmp_path)
    again = load("llama-lm", tmp_path, device_map="auto")
    assert torch.equal(run(again, sample_inputs), expected)


def test_bfloat16_load_and_reload(tiny_dirs, sample_inputs, tmp_path):
    fp32 = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=4))
    bf16 = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=4), dtype=torch.bfloat16)
    out = run(bf16, sample_inputs)
    assert out.dtype == torch.bfloat16
    # Same codes from bf16 weights as from fp32 ones is not guaranteed; outputs must agree loosely.
    ref = run(fp32, sample_inputs)
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.99, float(cos)
    bf16.save_pretrained(tmp_path)
    again = load("llama-lm", tmp_path, dtype=torch.bfloat16)
    assert torch.equal(run(again, sample_inputs), out)


def test_a_cast_model_saves_the_scale_dtype_it_holds(tiny_dirs, sample_inputs, tmp_path):
    """model.to(bfloat16) casts the fp16 scales; config.json must then say bfloat16, or the reload is refused."""
    model = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=4)).to(torch.bfloat16)
    assert {m.weight_scale.dtype for m in quantized_layers(model).values()} == {torch.bfloat16}
    out = run(model, sample_inputs)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["scale_dtype"] == "bfloat16"
    again = load("llama-lm", tmp_path)  # float32 layers, the scales as stored
    assert {m.weight_scale.dtype for m in quantized_layers(again).values()} == {torch.bfloat16}
    assert torch.equal(run(again.to(torch.bfloat16), sample_inputs), out)  # cast as the saved model was


def test_scales_held_in_two_dtypes_are_not_saved(tiny_dirs, tmp_path):
    model = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=4))
    name, layer = next(iter(quantized_layers(model).items()))
    layer.weight_scale = layer.weight_scale.float()
    held = rf"held in torch\.float32 \(e\.g\. {re.escape(name)}\), torch\.float16 \(e\.g\. {re.escape(name)}\)"
    with pytest.raises(ValueError, match=rf"cannot save: SplitQuant scales and offsets are {held}"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_dequantized_model_saves_as_plain_float(tiny_dirs, sample_inputs, tmp_path):
    model = load("gpt2-lm", tiny_dirs["gpt2-lm"], quantization_config=SplitQuantConfig(bits=2))
    expected = run(model, sample_inputs)
    model.dequantize()
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    again = load("gpt2-lm", tmp_path)
    assert not quantized_layers(again)
    torch.testing.assert_close(run(again, sample_inputs), expected, rtol=0, atol=0)


def test_size_report_counts_packed_buffers(tiny_dirs):
    model = load("bert-seqcls", tiny_dirs["bert-seqcls"], quantization_config=SplitQuantConfig(bits=2))
    report = size_report(model)
    layers = quantized_layers(model).values()
    assert report.quantized_layers == len(layers)
    assert report.quantized_weights == sum(m.in_features * m.out_features for m in layers)
    # 2-bit codes + 2-bit ids, plus 2 x 3 fp16 numbers per 32- or 64-wide row.
    assert 4.0 < report.effective_bits <= 4.0 + 96 / 32
    assert model.get_memory_footprint() == report.total_bytes


# ---- bad checkpoints and bad settings ----------------------------------------------------------


@pytest.fixture
def saved_bert(tiny_dirs, tmp_path):
    model = load("bert-seqcls", tiny_dirs["bert-seqcls"], quantization_config=SplitQuantConfig(bits=2))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_missing_quantized_tensor_is_an_error(saved_bert):
    rewrite_weights(saved_bert, lambda t: t.pop("bert.encoder.layer.0.attention.self.query.weight_scale"))
    with pytest.raises(
        ValueError, match=r"missing tensor 'bert\.encoder\.layer\.0\.attention\.self\.query\.weight_scale'"
    ):
        load("bert-seqcls", saved_bert)


def test_mis_shaped_tensor_is_an_error(saved_bert):
    key = "bert.encoder.layer.1.output.dense.weight_packed"
    rewrite_weights(saved_bert, lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))
    with pytest.raises(ValueError, match=r"weight_packed.*expected shape"):
        load("bert-seqcls", saved_bert)


def test_unknown_format_version_in_config_is_an_error(saved_bert):
    cfg_file = saved_bert / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["format_version"] = 99
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 99"):
        load("bert-seqcls", saved_bert)


def test_unknown_format_version_in_header_is_an_error(saved_bert):
    path = saved_bert / "model.safetensors"
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_FORMAT_KEY: "7"})
    with pytest.raises(ValueError, match="format version '7'"):
        load("bert-seqcls", saved_bert)


def test_group_size_that_does_not_divide_names_the_layer(tiny_dirs):
    with pytest.raises(ValueError, match=r"group_size=24 does not divide the input width 32"):
        load("bert-seqcls", tiny_dirs["bert-seqcls"], quantization_config=SplitQuantConfig(bits=2, group_size=24))


def test_explicit_modules_to_not_convert(tiny_dirs):
    cfg = SplitQuantConfig(bits=2, modules_to_not_convert=["attention.output.dense"])
    model = load("bert-seqcls", tiny_dirs["bert-seqcls"], quantization_config=cfg)
    layers = quantized_layers(model)
    assert "classifier" in layers, "an explicit list replaces the default head policy"
    assert not any(n.endswith("attention.output.dense") for n in layers)
    kept = model.config.quantization_config.modules_to_not_convert
    assert kept == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]


def test_tied_output_embeddings_are_never_quantized(tiny_dirs):
    model = load(
        "gpt2-lm", tiny_dirs["gpt2-lm"], quantization_config=SplitQuantConfig(bits=2, modules_to_not_convert=[])
    )
    assert "lm_head" not in quantized_layers(model)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_registration_survives_reimport():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    importlib.reload(importlib.import_module("optimum_splitquant.hf.registration")).register()
    optimum_splitquant._register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["splitquant"] is optimum_splitquant.SplitQuantConfig
    assert AUTO_QUANTIZER_MAPPING["splitquant"] is optimum_splitquant.SplitQuantHfQuantizer


def test_in_memory_quantization_matches_load_time(tiny_dirs, sample_inputs, tmp_path):
    on_load = load("bert-seqcls", tiny_dirs["bert-seqcls"], quantization_config=SplitQuantConfig(bits=2))
    float_model = load("bert-seqcls", tiny_dirs["bert-seqcls"])
    in_mem = optimum_splitquant.quantize_model(float_model, SplitQuantConfig(bits=2))
    assert torch.equal(run(in_mem, sample_inputs), run(on_load, sample_inputs))
    in_mem.save_pretrained(tmp_path)
    assert torch.equal(run(load("bert-seqcls", tmp_path), sample_inputs), run(on_load, sample_inputs))


def test_optimum_interface(tiny_dirs, sample_inputs, tmp_path):
    from optimum.quantization_base import OptimumQuantizer

    quantizer = optimum_splitquant.SplitQuantizer.from_pretrained(tiny_dirs["bert-seqcls"])
    assert isinstance(quantizer, OptimumQuantizer)
    model = quantizer.quantize(tmp_path, quantization_config=SplitQuantConfig(bits=2))
    assert isinstance(model, AutoModelForSequenceClassification._model_mapping[type(model.config)])
    again = load("bert-seqcls", tmp_path)
    assert torch.equal(run(again, sample_inputs), run(model, sample_inputs))


def test_causal_lm_loss_is_finite(tiny_dirs, sample_inputs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=2))
    ids = sample_inputs["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


def test_cluster_ids_out_of_range_are_an_error(saved_bert):
    key = "bert.encoder.layer.0.intermediate.dense.weight_packed"
    # 0xFF in a 4-bit symbol layout means cluster id 3 with k = 3.
    rewrite_weights(saved_bert, lambda t: t[key].__setitem__((0, 0), 0xFF))
    with pytest.raises(ValueError, match=r"intermediate\.dense: weight_packed holds cluster id 3"):
        load("bert-seqcls", saved_bert)


def test_non_finite_scale_is_an_error(saved_bert):
    key = "bert.encoder.layer.0.output.dense.weight_scale"
    rewrite_weights(saved_bert, lambda t: t[key].__setitem__((0, 0, 0), float("nan")))
    with pytest.raises(ValueError, match=r"output\.dense: weight_scale holds NaN"):
        load("bert-seqcls", saved_bert)


def _mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges of ``file``'s memory mappings in this process (Linux ``/proc/self/maps``)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and Path(parts[5]) == file:
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_float_tensors_left_after_quantizing_at_load_do_not_pin_the_float_file(tiny_dirs):
    """Quantizing at load reads the whole float file; what stays float must not keep it mapped."""
    folder = Path(tiny_dirs["gpt2-lm"]).resolve()
    file = folder / "model.safetensors"
    float_model = load("gpt2-lm", folder)
    ptr = float_model.transformer.wte.weight.data_ptr()
    if not any(lo <= ptr < hi for lo, hi in _mapped_ranges(file)):
        pytest.skip("transformers did not memory-map the checkpoint here")
    del float_model
    model = load("gpt2-lm", folder, quantization_config=SplitQuantConfig(bits=2))
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    ranges = _mapped_ranges(file)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not any(lo <= t.data_ptr() < hi for lo, hi in ranges), f"{name} still points into {file.name}"
