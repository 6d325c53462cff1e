"""The model card: valid Hub YAML front matter, honest numbers, and the loading instructions."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from optimum_splitquant import SplitQuantConfig
from optimum_splitquant.cli.card import CardInfo, Metric, model_card


def _info(**overrides) -> CardInfo:
    config = SplitQuantConfig(bits=2, modules_to_not_convert=["pooler.dense"]).to_dict()
    fields = {
        "quantization_config": config,
        "task": "feature-extraction",
        "effective_bits": 4.1875,
        "quantized_layers": 36,
        "quantized_weights": 10_616_832,
        "size_after": 53_963_184,
        "size_before": 90_868_376,
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "repo_id": "me/minilm-splitquant-int2",
    }
    fields.update(overrides)
    return CardInfo(**fields)


def test_front_matter_is_valid_hub_metadata():
    card = ModelCard(model_card(_info()))
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["base_model_relation"] == "quantized"
    assert meta["pipeline_tag"] == "feature-extraction"
    assert meta["tags"] == ["splitquant", "quantized", "int2"]
    block = meta["splitquant"]
    assert block["quantization_config"] == SplitQuantConfig(bits=2, modules_to_not_convert=["pooler.dense"]).to_dict()
    assert block["effective_bits_per_weight"] == pytest.approx(4.1875)
    assert block["size_bytes_before"] == 90_868_376 and block["size_bytes_after"] == 53_963_184
    assert "evaluation" not in block


def test_body_says_how_to_load_and_what_happens_without_the_import():
    text = model_card(_info())
    body = text.split("---\n", 2)[2]
    assert 'import optimum_splitquant  # registers quant_method="splitquant"' in body
    assert 'AutoModel.from_pretrained("me/minilm-splitquant-int2")' in body
    assert "random weights" in body and "Unknown quantization type" in body
    assert "4.188 (codes + cluster ids + scales + offsets)" in body
    assert "90.9 MB → 54.0 MB (1.68x smaller)" in body
    assert "`pooler.dense`" in body


@pytest.mark.parametrize(
    ("task", "auto"),
    [
        ("text-classification", "AutoModelForSequenceClassification"),
        ("text-generation", "AutoModelForCausalLM"),
    ],
)
def test_loading_snippet_uses_the_task_class(task, auto):
    body = model_card(_info(task=task))
    assert f"{auto}.from_pretrained(" in body
    assert f'pipeline("{task}"' in body


def test_evaluation_results_in_metadata_and_table():
    metrics = [Metric("accuracy", "SMS Spam Collection, 1000 held-out messages", 0.935, 0.98)]
    text = model_card(_info(task="text-classification", metrics=metrics))
    evaluation = ModelCard(text).data.to_dict()["splitquant"]["evaluation"]
    assert evaluation == [
        {
            "name": "accuracy",
            "dataset": "SMS Spam Collection, 1000 held-out messages",
            "value": 0.935,
            "base_value": 0.98,
        }
    ]
    assert "| accuracy | SMS Spam Collection, 1000 held-out messages | 0.9350 | 0.9800 |" in text


def test_local_base_without_hub_id_is_named_but_not_declared():
    text = model_card(_info(base_model=None, base_name="my-bert", repo_id=None, size_before=None))
    meta = ModelCard(text).data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "`my-bert`" in text
    assert 'from_pretrained("path/to/this/folder")' in text
    assert "unknown → 54.0 MB" in text


def test_plain_min_max_is_not_called_splitquant():
    config = SplitQuantConfig(bits=4, num_clusters=1).to_dict()
    text = model_card(_info(quantization_config=config))
    assert "INT4 (min-max)" in text and "plain min-max quantization (one cluster)" in text
    assert ModelCard(text).data.to_dict()["tags"] == ["splitquant", "quantized", "int4"]
