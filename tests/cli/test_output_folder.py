"""``quantize --output``: a non-empty folder is refused unless ``--overwrite``, and is then replaced whole or not at all."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertModel

from optimum_splitquant.cli import commands, output_folder, quantize

from .test_cli import _assert_one_error_line, _bert_config, _must_not_load, _save, _snapshot


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return _save(BertModel(_bert_config()), tmp_path_factory.mktemp("base"))


def _quantize(base: str, out: Path, *extra: str, bits: int = 2) -> int:
    return commands.main(["quantize", base, "--bits", str(bits), "--output", str(out), *extra])


def _bits(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]


def _leftovers(parent: Path) -> list[str]:
    """Staging folders a save left behind next to (or inside) its target."""
    return sorted(p.name for p in parent.rglob(".*saving-*"))


@pytest.fixture
def saved(base, tmp_path) -> Path:
    """A previous quantized save, with a file of the user's own added to it."""
    out = tmp_path / "int2"
    assert _quantize(base, out) == 0
    (out / "notes.txt").write_text("mine\n")
    return out


def test_a_non_empty_folder_is_refused_before_loading(saved, base, monkeypatch, capsys):
    before = _snapshot(saved)
    monkeypatch.setattr(quantize, "load_config", _must_not_load)
    assert _quantize(base, saved, bits=4) == 1
    _assert_one_error_line(
        capsys.readouterr().err, f"output folder '{saved}' already exists and is not empty; choose another --output"
    )
    assert _snapshot(saved) == before


def test_overwrite_replaces_the_whole_folder(saved, base, capsys):
    inode = saved.stat().st_ino
    assert _quantize(base, saved, "--overwrite", bits=4) == 0
    assert _bits(saved) == 4
    assert not (saved / "notes.txt").exists(), "--overwrite replaces the folder's whole content"
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in saved.iterdir()}
    assert saved.stat().st_ino != inode  # a new folder swapped in, not the old one rewritten
    assert _leftovers(saved.parent) == []
    AutoModel.from_pretrained(saved)


def test_a_failed_overwrite_keeps_the_previous_model(saved, base, monkeypatch, capsys):
    before = _snapshot(saved)

    def broken_card(info):
        raise RuntimeError("disk full")

    monkeypatch.setattr(quantize, "model_card", broken_card)
    assert _quantize(base, saved, "--overwrite", bits=4) == 1
    _assert_one_error_line(capsys.readouterr().err, "disk full")
    assert _snapshot(saved) == before
    assert _leftovers(saved.parent) == []


def test_overwrite_refuses_a_folder_without_a_saved_model(base, tmp_path, capsys):
    work = tmp_path / "project"
    work.mkdir()
    (work / "main.py").write_text("print('hello')\n")
    before = _snapshot(work)
    assert _quantize(base, work, "--overwrite") == 1
    _assert_one_error_line(capsys.readouterr().err, f"output folder '{work}' holds no saved model (no config.json)")
    assert _snapshot(work) == before


def test_overwrite_refuses_a_folder_holding_the_input_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = Path(_save(BertModel(_bert_config()), tmp_path / "models" / "float"))
    (tmp_path / "models" / "config.json").write_text("{}\n")
    before = _snapshot(tmp_path / "models")
    argv = ["quantize", str(model), "--bits", "2", "--output", str(tmp_path / "models"), "--overwrite"]
    assert commands.main(argv) == 1
    _assert_one_error_line(capsys.readouterr().err, "contains the input model")
    assert _snapshot(tmp_path / "models") == before


def test_overwrite_refuses_the_current_directory(saved, base, monkeypatch, capsys):
    before = _snapshot(saved)
    monkeypatch.chdir(saved)
    assert _quantize(base, Path("."), "--overwrite") == 1
    _assert_one_error_line(capsys.readouterr().err, "is (or contains) the current directory")
    assert _snapshot(saved) == before


def test_an_empty_folder_is_filled_in_place(base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    inode = out.stat().st_ino
    monkeypatch.chdir(out)
    assert _quantize(base, Path(".")) == 0  # `--output .` in an empty directory
    assert out.stat().st_ino == inode and _bits(out) == 2
    assert _leftovers(out) == []
    AutoModel.from_pretrained(out)


def test_a_failed_run_leaves_an_empty_folder_empty(base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "empty"
    out.mkdir()

    def broken_card(info):
        raise RuntimeError("disk full")

    monkeypatch.setattr(quantize, "model_card", broken_card)
    assert _quantize(base, out) == 1
    _assert_one_error_line(capsys.readouterr().err, "disk full")
    assert list(out.iterdir()) == []


def test_a_failed_run_leaves_no_new_folders(base, tmp_path, monkeypatch, capsys):
    def broken_card(info):
        raise RuntimeError("disk full")

    monkeypatch.setattr(quantize, "model_card", broken_card)
    assert _quantize(base, tmp_path / "a" / "b" / "int2") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_folder_appears_only_when_complete(base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "int2"
    seen = []
    real_card = quantize.model_card

    def watching_card(info):
        seen.append(out.exists())
        return real_card(info)

    monkeypatch.setattr(quantize, "model_card", watching_card)
    assert _quantize(base, out) == 0
    assert seen == [False] and (out / "README.md").is_file()


def test_a_read_only_parent_is_a_clear_error(base, tmp_path, monkeypatch, capsys):
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(output_folder.tempfile, "TemporaryFile", refused)  # root ignores chmod: refuse the write probe
    assert _quantize(base, tmp_path / "new" / "int2") == 1
    _assert_one_error_line(
        capsys.readouterr().err, f"cannot write to output directory '{tmp_path / 'new' / 'int2'}': Permission denied"
    )
    assert list(tmp_path.iterdir()) == []  # the parent folder it created is removed again


@pytest.mark.parametrize("start", ["new", "empty"])
def test_files_that_appear_meanwhile_are_never_replaced(start, base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "int2"
    if start == "empty":
        out.mkdir()
    real_card = quantize.model_card

    def card_while_someone_writes(info):
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text('{"theirs": true}\n')
        return real_card(info)

    monkeypatch.setattr(quantize, "model_card", card_while_someone_writes)
    assert _quantize(base, out) == 1
    _assert_one_error_line(capsys.readouterr().err, "received other files while the model was being written")
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == '{"theirs": true}\n'
    assert _leftovers(tmp_path) == []


def _not_a_model(folder: Path, config: str | None, weights: bool = False) -> Path:
    """A project folder: a git repository, data, notes, and maybe a config.json and weights."""
    folder.mkdir()
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "data").mkdir()
    (folder / "data" / "train.csv").write_text("text,label\nhi,0\n")
    (folder / "notes.txt").write_text("mine\n")
    if config is not None:
        (folder / "config.json").write_text(config)
    if weights:
        (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return folder


@pytest.mark.parametrize(
    ("config", "weights", "missing"),
    [
        ('{"a": 1}', True, "config.json has no model_type"),
        ('{"model_type": ""}', True, "config.json has no model_type"),
        ('["bert"]', True, "config.json has no model_type"),
        ("not json", True, "config.json is not valid JSON"),
        (
            '{"model_type": "bert"}',
            False,
            "no model weights: no *.safetensors file and no model.safetensors.index.json",
        ),
    ],
    ids=["no-model-type", "empty-model-type", "not-an-object", "not-json", "no-weights"],
)
def test_overwrite_refuses_a_folder_that_only_looks_like_a_model(config, weights, missing, base, tmp_path, capsys):
    work = _not_a_model(tmp_path / "project", config, weights)
    before = _snapshot(work)
    assert _quantize(base, work, "--overwrite") == 1
    _assert_one_error_line(capsys.readouterr().err, f"output folder '{work}' holds no saved model ({missing}")
    assert _snapshot(work) == before and (work / ".git").is_dir()


def test_overwrite_replaces_a_sharded_save(saved, base, capsys):
    (saved / "model.safetensors").rename(saved / "model-00001-of-00001.safetensors")
    assert _quantize(base, saved, "--overwrite", bits=4) == 0
    assert _bits(saved) == 4


# ---- staging folders of a run killed with kill -9 ------------------------------------------------------------

# What a killed run leaves: its staging folder, half written (a dead process holds no lock on it).
_KILLED = """
import os, signal, sys
os.mkdir(sys.argv[1])
with open(os.path.join(sys.argv[1], "model.safetensors"), "wb") as f:
    f.write(b"half written")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_run(staging: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(staging)], check=False)
    assert proc.returncode == -signal.SIGKILL and (staging / "model.safetensors").is_file()


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(base, tmp_path, capsys):
    out = tmp_path / "int2"
    _killed_run(tmp_path / f".int2.saving-{'a' * 32}")
    assert _quantize(base, out) == 0
    assert _leftovers(tmp_path) == [] and _bits(out) == 2


def test_a_killed_in_place_run_leaves_the_folder_empty_for_the_next_run(base, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    inode = out.stat().st_ino
    _killed_run(out / f".saving-{'b' * 32}")
    assert _quantize(base, out) == 0  # no --overwrite needed: only our own leftover was there
    assert out.stat().st_ino == inode and _bits(out) == 2
    assert _leftovers(tmp_path) == []
