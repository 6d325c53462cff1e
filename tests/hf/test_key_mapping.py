"""Reloading a SplitQuant save under the names transformers' loader gives its keys.

transformers 5 renames checkpoint keys while loading: it drops or adds the base model's prefix
(``AutoModel`` from a ``BertForSequenceClassification`` save) and converts legacy layouts (every
ViT-family save). A SplitQuant layer must be found under the same name its float twin would be.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from tiny import load, quantized_layers, rewrite_weights, run
from transformers import AutoModel, LlamaModel, ViTConfig, ViTForImageClassification, ViTModel

from optimum_splitquant import SplitQuantConfig


def _stored_keys(folder) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def _hidden(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


# ---- base model from a save with a head (prefix dropped), and the reverse (prefix added) ---------


@pytest.fixture(scope="module")
def bert_seqcls_q(tiny_dirs, tmp_path_factory):
    """A SplitQuant INT2 save of the tiny BertForSequenceClassification (keys under ``bert.``)."""
    folder = tmp_path_factory.mktemp("q-bert-seqcls")
    full = load("bert-seqcls", tiny_dirs["bert-seqcls"], quantization_config=SplitQuantConfig(bits=2))
    full.save_pretrained(folder)
    return full, folder


def test_base_model_from_a_save_with_a_head(bert_seqcls_q, sample_inputs):
    full, folder = bert_seqcls_q
    assert "bert.encoder.layer.0.attention.self.query.weight_packed" in _stored_keys(folder)
    base = AutoModel.from_pretrained(folder).eval()
    assert type(base).__name__ == "BertModel"
    assert set(quantized_layers(base)) == {n.removeprefix("bert.") for n in quantized_layers(full)}
    assert torch.equal(_hidden(base, sample_inputs), _hidden(full.bert, sample_inputs))


def test_model_with_a_head_from_a_base_model_save(tiny_dirs, sample_inputs, tmp_path):
    base = load("bert-base", tiny_dirs["bert-base"], quantization_config=SplitQuantConfig(bits=2))
    base.save_pretrained(tmp_path)
    assert "encoder.layer.0.attention.self.query.weight_packed" in _stored_keys(tmp_path)
    full = load("bert-seqcls", tmp_path)  # the classifier is new (random, float); the encoder is the save's
    assert set(quantized_layers(full)) == {f"bert.{n}" for n in quantized_layers(base)}
    assert torch.equal(_hidden(full.bert, sample_inputs), _hidden(base, sample_inputs))


def test_llama_base_model_from_a_causal_lm_save(tiny_dirs, sample_inputs, tmp_path):
    full = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=2))
    full.save_pretrained(tmp_path)
    base = LlamaModel.from_pretrained(tmp_path).eval()
    assert set(quantized_layers(base)) == {n.removeprefix("model.") for n in quantized_layers(full)}
    assert torch.equal(run(base, sample_inputs), run(full.model, sample_inputs))


def test_a_quantized_head_outside_the_base_model_is_skipped(tiny_dirs, sample_inputs, tmp_path, caplog):
    """As transformers skips a head's float tensors when it loads the base model, so the SplitQuant ones."""
    config = SplitQuantConfig(bits=2, modules_to_not_convert=[])
    full = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=config)
    assert "lm_head" in quantized_layers(full)
    full.save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="optimum_splitquant"):
        base = LlamaModel.from_pretrained(tmp_path).eval()
    assert "lie outside LlamaModel" in caplog.text and "lm_head" in caplog.text
    assert torch.equal(run(base, sample_inputs), run(full.model, sample_inputs))


# ---- ViT: a legacy key layout, renamed by the model's registered conversions ---------------------


def _vit_config() -> ViTConfig:
    return ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )


@pytest.fixture(scope="module")
def vit_q(tmp_path_factory):
    """A tiny ViT classifier (float folder) and its SplitQuant INT2 save; 2 x 6 Linear + the patch Conv2d."""
    torch.manual_seed(0)
    float_dir = tmp_path_factory.mktemp("float-vit")
    ViTForImageClassification(_vit_config()).save_pretrained(float_dir)
    full = ViTForImageClassification.from_pretrained(float_dir, quantization_config=SplitQuantConfig(bits=2)).eval()
    folder = tmp_path_factory.mktemp("q-vit")
    full.save_pretrained(folder)
    return full, folder


@pytest.fixture(scope="module")
def pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def test_vit_save_uses_the_legacy_layout_and_reloads(vit_q, pixels):
    full, folder = vit_q
    layers = quantized_layers(full)
    assert "vit.layers.0.attention.q_proj" in layers and "vit.embeddings.patch_embeddings.projection" in layers
    stored = _stored_keys(folder)
    assert "vit.encoder.layer.0.attention.attention.query.weight_packed" in stored  # transformers reverts the names
    again = ViTForImageClassification.from_pretrained(folder).eval()
    assert set(quantized_layers(again)) == set(layers)
    with torch.no_grad():
        assert torch.equal(again(**pixels).logits, full(**pixels).logits)


def test_vit_base_model_from_a_classifier_save(vit_q, pixels):
    full, folder = vit_q
    base = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    assert set(quantized_layers(base)) == {n.removeprefix("vit.") for n in quantized_layers(full)}
    assert torch.equal(_hidden(base, pixels), _hidden(full.vit, pixels))


def test_damage_under_a_renamed_key_names_both_names(vit_q, tmp_path):
    _, saved = vit_q
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in saved.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    key = "vit.encoder.layer.1.intermediate.dense.weight_scale"
    rewrite_weights(folder, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    message = re.escape("tensor 'vit.layers.1.mlp.fc1.weight_scale' (stored as " + repr(key) + ") in model.safetensors")
    with pytest.raises(ValueError, match=message + r" has shape \[63, 1, 3\]"):
        ViTForImageClassification.from_pretrained(folder)
    rewrite_weights(folder, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"missing tensor 'vit\.layers\.1\.mlp\.fc1\.weight_scale' \(module stored "):
        ViTForImageClassification.from_pretrained(folder)

    def move(tensors):
        for k in [k for k in tensors if k.startswith("vit.encoder.layer.1.intermediate.dense.")]:
            tensors[k.replace("dense", "wide")] = tensors.pop(k)

    rewrite_weights(folder, move)
    with pytest.raises(ValueError, match=r"intermediate\.wide \(loads as vit\.layers\.1\.intermediate\.wide\)'\]"):
        ViTForImageClassification.from_pretrained(folder)


# ---- a key_mapping passed to from_pretrained ---------------------------------------------------------


@pytest.fixture
def renamed_pooler(bert_seqcls_q, tmp_path):
    """The BERT save with the pooler's tensors stored as ``bert.pooler.proj.*`` (names the model lacks)."""
    full, saved = bert_seqcls_q
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in saved.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())

    def move(tensors):
        for key in [k for k in tensors if k.startswith("bert.pooler.dense.")]:
            tensors[key.replace("pooler.dense", "pooler.proj")] = tensors.pop(key)

    rewrite_weights(folder, move)
    return full, folder


def test_key_mapping_leads_stored_layers_to_the_model(renamed_pooler, sample_inputs):
    full, folder = renamed_pooler
    with pytest.raises(ValueError, match=r"\['bert\.pooler\.proj'\] which are not Linear/Conv1D/Conv2d layers"):
        load("bert-seqcls", folder)
    again = load("bert-seqcls", folder, key_mapping={r"pooler\.proj": "pooler.dense"})
    assert set(quantized_layers(again)) == set(quantized_layers(full))
    assert torch.equal(run(again, sample_inputs), run(full, sample_inputs))


def test_key_mapping_that_renames_a_layer_already_found_is_refused(renamed_pooler):
    _, folder = renamed_pooler
    mapping = {r"pooler\.proj": "pooler.dense", r"attention\.self\.query": "attention.self.key"}
    with pytest.raises(ValueError, match=r"key mapping of this load renames the SplitQuant layer stored as"):
        load("bert-seqcls", folder, key_mapping=mapping)


def test_a_layer_the_model_lacks_is_still_refused(tiny_dirs, tmp_path):
    full = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=2))
    full.save_pretrained(tmp_path)

    def move(tensors):
        for key in [k for k in tensors if k.startswith("model.layers.0.mlp.up_proj.")]:
            tensors[key.replace("up_proj", "upper_proj")] = tensors.pop(key)

    rewrite_weights(tmp_path, move)
    with pytest.raises(
        ValueError, match=r"\['model\.layers\.0\.mlp\.upper_proj'\] which are not .* of LlamaForCausalLM"
    ):
        load("llama-lm", tmp_path)
    with pytest.raises(ValueError, match=r"\['model\.layers\.0\.mlp\.upper_proj'\] which are not .* of LlamaModel"):
        LlamaModel.from_pretrained(tmp_path)  # the prefix is dropped only for keys the model has, as transformers does
