"""Every command reads safetensors only: a pickle is refused unread, with one message, on every path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertModel

from optimum_splitquant.cli import commands

from .test_cli import _assert_one_error_line, _bert_config, _save

NOT_A_PICKLE = b"never read: a pickle would be unpickled here"


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return Path(_save(BertModel(_bert_config()), tmp_path_factory.mktemp("float")))


@pytest.fixture(scope="module")
def quantized_dir(float_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "int2"
    assert commands.main(["quantize", str(float_dir), "--bits", "2", "--output", str(out)]) == 0
    return out


def _pickled(float_dir: Path, folder: Path, layout: str) -> str:
    """A copy of ``float_dir`` whose weights transformers would read from a pickle; returns the pickle's name."""
    folder.mkdir()
    for path in float_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    if layout == "pickle-only":
        (folder / "model.safetensors").unlink()
        name = "pytorch_model.bin"
    elif layout == "config-names-it":  # transformers loads the file config.json names, whatever else is there
        name = "adapter_model.bin"
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": name}))
    else:  # an index listing a pickle shard
        (folder / "model.safetensors").unlink()
        name = "pytorch_model-00001-of-00001.bin"
        index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": name}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / name).write_bytes(NOT_A_PICKLE)
    return name


@pytest.fixture
def no_torch_load(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load was called: a pickle would have been unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    yield
    assert calls == []


LAYOUTS = ["pickle-only", "config-names-it", "index-names-it"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["quantize", "quantize --evaluate", "evaluate", "evaluate --base"])
def test_a_pickle_is_refused_unread(mode, layout, float_dir, quantized_dir, tmp_path, no_torch_load, capsys):
    name = _pickled(float_dir, tmp_path / "pickled", layout)
    model = str(tmp_path / "pickled")
    argv = {
        "quantize": ["quantize", model, "--bits", "2", "--output", str(tmp_path / "out")],
        "quantize --evaluate": ["quantize", model, "--bits", "2", "--output", str(tmp_path / "out"), "--evaluate"],
        "evaluate": ["evaluate", model],
        "evaluate --base": ["evaluate", str(quantized_dir), "--base", model],
    }[mode]
    assert commands.main(argv) == 1
    _assert_one_error_line(
        capsys.readouterr().err,
        f"optimum-splitquant: error: {name}: SplitQuant reads only safetensors checkpoints (no pickle); convert the "
        "model with `model.save_pretrained(dir)` (safetensors by default) and load that folder",
    )
    assert not (tmp_path / "out").exists()


def test_quantize_and_evaluate_say_the_same(float_dir, tmp_path, no_torch_load, capsys):
    _pickled(float_dir, tmp_path / "pickled", "pickle-only")
    argv = ["quantize", str(tmp_path / "pickled"), "--bits", "2", "--output", str(tmp_path / "out")]
    assert commands.main(argv) == 1
    plain = capsys.readouterr().err
    assert commands.main([*argv, "--evaluate"]) == 1
    assert capsys.readouterr().err == plain


def test_safetensors_beside_a_pickle_load_as_before(float_dir, tmp_path, no_torch_load, capsys):
    folder = tmp_path / "both"
    folder.mkdir()
    for path in float_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(NOT_A_PICKLE)  # transformers prefers model.safetensors
    argv = ["quantize", str(folder), "--bits", "2", "--output", str(tmp_path / "out"), "--evaluate", "--limit", "8"]
    assert commands.main(argv) == 0
    assert "mean cosine to float embeddings" in capsys.readouterr().out
