"""The model card: valid Hub YAML front matter, honest numbers, and the loading instructions."""

from __future__ import annotations

import logging

import pytest
from huggingface_hub import ModelCard

from optimum_splitquant import SplitQuantConfig
from optimum_splitquant.cli.card import CardInfo, Metric, base_card_metadata, model_card, parse_front_matter


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
    assert "OPTIMUM_SPLITQUANT_NO_AUTOLOAD=1" in body  # where the start-up hook is off, the import is needed
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


# ---- metadata kept from the float model's card --------------------------------------------------------------

BASE_CARD = """---
language: en
license: apache-2.0
library_name: sentence-transformers
base_model: nreimers/MiniLM-L6-H384-uncased
tags:
- sentence-transformers
- quantized
datasets:
- s2orc
- ms_marco
pipeline_tag: sentence-similarity
---

# all-MiniLM-L6-v2
"""


def test_base_card_fields_are_kept_and_tags_merged():
    base = parse_front_matter(BASE_CARD)
    assert base == {
        "license": "apache-2.0",
        "language": "en",
        "datasets": ["s2orc", "ms_marco"],
        "tags": ["sentence-transformers", "quantized"],
    }
    meta = ModelCard(model_card(_info(base_metadata=base))).data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["language"] == "en"
    assert meta["datasets"] == ["s2orc", "ms_marco"]
    assert meta["tags"] == ["splitquant", "quantized", "int2", "sentence-transformers"]
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"  # the input, not the base's own base
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "feature-extraction"


def test_an_other_license_keeps_its_name_and_link():
    text = "---\nlicense: other\nlicense_name: my-license\nlicense_link: LICENSE.md\nlanguage: [en, fr]\n---\n"
    meta = ModelCard(model_card(_info(base_metadata=parse_front_matter(text)))).data.to_dict()
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "my-license", "LICENSE.md")
    assert meta["language"] == ["en", "fr"]


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        ("---\nlicense: [unclosed\n---\n", "malformed"),
        ("---\n- a\n- b\n---\n", "not a mapping"),
        ("---\nlicense: [mit]\ntags: 3\n---\n", "'license' in its front matter is not a string"),
        ("---\n!!python/object/apply:os.system ['echo hi']\n---\n", "malformed"),
    ],
    ids=["bad-yaml", "not-a-mapping", "wrong-types", "python-tag"],
)
def test_a_bad_base_card_is_a_warning_not_a_failure(text, warning, caplog):
    with caplog.at_level(logging.WARNING, logger="optimum_splitquant"):
        assert parse_front_matter(text, "base/README.md") == {}
    assert "base/README.md" in caplog.text and warning in caplog.text


def test_no_front_matter_means_nothing_kept(tmp_path):
    assert parse_front_matter("# a model\n\nno metadata here\n") == {}
    assert parse_front_matter("---\n---\n") == {}
    assert base_card_metadata(str(tmp_path)) == {}  # a folder without README.md
    (tmp_path / "README.md").write_text(BASE_CARD)
    assert base_card_metadata(str(tmp_path))["license"] == "apache-2.0"


def test_a_sentence_transformers_folder_says_how_to_embed():
    assert "SentenceTransformer" not in model_card(_info())
    body = model_card(_info(sentence_transformers=True))
    assert 'SentenceTransformer("me/minilm-splitquant-int2").encode(' in body
    assert body.index("import optimum_splitquant  # first") < body.index("from sentence_transformers")
