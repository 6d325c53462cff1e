"""``verify_checkpoint`` on a damaged or crafted folder: a ``ValueError`` naming the file and what is wrong."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification, BertConfig

import optimum_splitquant as osq
from optimum_splitquant.checkpoint.format import METADATA_SETTINGS_KEY

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny SplitQuant INT2 BERT folder: 6 encoder Linear layers (the pooler stays float); read-only."""
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    float_dir = tmp_path_factory.mktemp("float-bert")
    AutoModel.from_config(config).save_pretrained(float_dir)
    folder = tmp_path_factory.mktemp("q-bert")
    AutoModel.from_pretrained(float_dir, quantization_config=osq.SplitQuantConfig(bits=2)).save_pretrained(folder)
    return folder


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    dest = tmp_path / "ckpt"
    shutil.copytree(saved, dest)
    return dest


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg = edit(cfg) or cfg
    path.write_text(json.dumps(cfg))


def _tensor_names(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def _write_index(folder: Path, shard: str) -> None:
    weight_map = dict.fromkeys(_tensor_names(folder), shard)
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_intact_checkpoint_verifies(saved):
    report = osq.verify_checkpoint(saved)
    assert report.files == ("model.safetensors",)
    assert report.quantized_layers == 6 and report.config.bits == 2


# ---- config.json ------------------------------------------------------------------------------------


def test_config_that_is_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object .* found a JSON array"):
        osq.verify_checkpoint(ckpt, load=False)


@pytest.mark.parametrize("value", [5, "BertModel", [5], {"name": "BertModel"}], ids=["int", "str", "list-int", "dict"])
def test_architectures_that_are_not_class_names(ckpt, value):
    _edit_config(ckpt, lambda c: c.__setitem__("architectures", value))
    with pytest.raises(ValueError, match=r"config\.json: architectures must be a list of model class names"):
        osq.verify_checkpoint(ckpt)


def test_quantization_config_that_is_a_string(ckpt):
    _edit_config(ckpt, lambda c: c.__setitem__("quantization_config", "splitquant"))
    with pytest.raises(ValueError, match=r"quantization_config must be a JSON object") as exc:
        osq.verify_checkpoint(ckpt, load=False)
    message = str(exc.value)
    assert "config.json" in message and 'found a JSON string "splitquant"' in message
    assert "not 'splitquant'" not in message


@pytest.mark.parametrize(
    ("method", "expected"),
    [("gptq", 'has quant_method "gptq", not "splitquant"'), (None, 'has no quant_method, not "splitquant"')],
    ids=["other-method", "no-method"],
)
def test_quantization_config_of_another_method(ckpt, method, expected):
    _edit_config(ckpt, lambda c: c["quantization_config"].__setitem__("quant_method", method))
    with pytest.raises(ValueError, match=r"config\.json: quantization_config") as exc:
        osq.verify_checkpoint(ckpt, load=False)
    assert expected in str(exc.value)


def test_quantization_config_with_an_unknown_field(ckpt):
    _edit_config(ckpt, lambda c: c["quantization_config"].update(sparsity=0.5))
    with pytest.raises(
        ValueError, match=r"config\.json: invalid quantization_config: .*unknown field\(s\) \['sparsity'\]"
    ):
        osq.verify_checkpoint(ckpt, load=False)


def test_deeply_nested_config(ckpt):
    (ckpt / "config.json").write_text('{"architectures": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ValueError, match=r"config\.json: JSON nested too deeply"):
        osq.verify_checkpoint(ckpt, load=False)


# ---- the model class that verification loads ---------------------------------------------------------


def _seqcls_save(tiny_dirs, folder: Path, **config) -> Path:
    """A SplitQuant INT2 save of the tiny BERT classifier (keys under ``bert.``), without ``architectures``."""
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_dirs["bert-seqcls"], quantization_config=osq.SplitQuantConfig(bits=2, **config)
    )
    model.save_pretrained(folder)
    _edit_config(folder, lambda c: {k: v for k, v in c.items() if k != "architectures"})
    return folder


def test_a_save_without_architectures_verifies_through_automodel(tiny_dirs, tmp_path):
    """AutoModel builds BertModel: the ``bert.`` prefix is dropped while loading, as for float weights."""
    folder = _seqcls_save(tiny_dirs, tmp_path / "q")
    assert osq.verify_checkpoint(folder).quantized_layers == 13  # 2 x 6 encoder Linear + the pooler
    _edit_config(folder, lambda c: c.__setitem__("architectures", ["NotATransformersClass"]))
    assert osq.verify_checkpoint(folder).quantized_layers == 13


def test_quantized_layers_outside_the_loaded_class_are_not_called_verified(tiny_dirs, tmp_path):
    folder = _seqcls_save(tiny_dirs, tmp_path / "q", modules_to_not_convert=[])  # the classifier too
    with pytest.raises(
        ValueError, match=r"BertModel .* loads only 13 of the 14 SplitQuant layers; \['classifier'\] were not checked"
    ):
        osq.verify_checkpoint(folder)
    _edit_config(folder, lambda c: c.__setitem__("architectures", ["BertForSequenceClassification"]))
    assert osq.verify_checkpoint(folder).quantized_layers == 14


def test_scale_dtype_that_disagrees_with_the_tensors(ckpt):
    _edit_config(ckpt, lambda c: c["quantization_config"].__setitem__("scale_dtype", "float32"))
    with pytest.raises(
        ValueError, match=r"stored as F16 \(float16\) but .*config\.json quantization_config\.scale_dtype is 'float32'"
    ):
        osq.verify_checkpoint(ckpt, load=False)


# ---- safetensors header -----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100000, 30000])
def test_deeply_nested_settings_header(ckpt, depth):
    path = ckpt / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={**meta, METADATA_SETTINGS_KEY: "[" * depth + "]" * depth})
    with pytest.raises(ValueError, match=rf"model\.safetensors: header field {METADATA_SETTINGS_KEY} is"):
        osq.verify_checkpoint(ckpt)
    with pytest.raises(ValueError, match=rf"model\.safetensors: header field {METADATA_SETTINGS_KEY} is"):
        AutoModel.from_pretrained(ckpt)  # loading runs the same header checks


# ---- model.safetensors.index.json -------------------------------------------------------------------


def test_sharded_checkpoint_inside_the_folder_verifies(ckpt):
    shard = "model-00001-of-00001.safetensors"
    _write_index(ckpt, shard)
    (ckpt / "model.safetensors").rename(ckpt / shard)
    report = osq.verify_checkpoint(ckpt)
    assert report.files == (shard,) and report.quantized_layers == 6


def test_shard_file_symlinked_like_the_hub_cache_verifies(ckpt, tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.move(ckpt / "model.safetensors", blobs / "0123abcd")
    (ckpt / "model.safetensors").symlink_to(blobs / "0123abcd")
    _write_index(ckpt, "model.safetensors")
    assert osq.verify_checkpoint(ckpt, load=False).files == ("model.safetensors",)


def _outside_index_cases(ckpt: Path, tmp_path: Path) -> dict[str, str]:
    """Index entries naming a real, valid copy of the weights outside the folder (so only the check stops them)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(ckpt / "model.safetensors", tmp_path / "x.safetensors")
    shutil.copy(ckpt / "model.safetensors", outside / "x.safetensors")
    (ckpt / "sub").symlink_to(outside, target_is_directory=True)
    return {
        "parent": "../x.safetensors",
        "absolute": str(tmp_path / "x.safetensors"),
        "dotdot-inside": "sub/../../x.safetensors",
        "symlinked-dir": "sub/x.safetensors",
    }


@pytest.mark.parametrize("case", ["parent", "absolute", "dotdot-inside", "symlinked-dir"])
def test_index_pointing_outside_the_folder_is_refused(ckpt, tmp_path, case):
    entry = _outside_index_cases(ckpt, tmp_path)[case]
    os.remove(ckpt / "model.safetensors")
    _write_index_with(ckpt, entry, tmp_path)
    first = next(iter(json.loads((ckpt / INDEX).read_text())["weight_map"]))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: weight_map entry") as exc:
        osq.verify_checkpoint(ckpt)
    message = str(exc.value)
    assert f"entry {first!r} -> {json.dumps(entry)}" in message
    assert "outside the checkpoint folder" in message


def _write_index_with(ckpt: Path, entry: str, tmp_path: Path) -> None:
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        names = list(f.keys())
    (ckpt / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, entry)}))


@pytest.mark.parametrize(
    "index", [[], {"weight_map": []}, {"weight_map": {}}, {"weight_map": {"fc.weight": 5}}], ids=str
)
def test_malformed_index_is_refused(ckpt, index):
    (ckpt / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: "):
        osq.verify_checkpoint(ckpt, load=False)
