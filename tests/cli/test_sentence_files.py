"""``quantize`` keeps a sentence-transformers model's pipeline files, and copies nothing unsafe."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModel, AutoTokenizer, BertModel

import optimum_splitquant  # noqa: F401  (registers the quantizer before any load)
from optimum_splitquant import SplitQuantConfig
from optimum_splitquant.cli import commands, quantize
from optimum_splitquant.cli.console import CliError
from optimum_splitquant.cli.data import minilm_path
from optimum_splitquant.cli.sentence_files import copy_sentence_files, sentence_files

from .test_cli import _assert_one_error_line, _bert_config, _save, _snapshot

TEXTS = ["the quick brown fox jumps over the lazy dog", "free entry to win a prize, text now", "see you at lunch"]
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def _st_folder(path: Path, modules: list | None = None) -> Path:
    """A tiny random BERT with the files of a sentence-transformers folder (mean pooling, normalize)."""
    torch.manual_seed(0)
    _save(BertModel(_bert_config()), path)
    (path / "modules.json").write_text(json.dumps(MODULES if modules is None else modules))
    (path / "config_sentence_transformers.json").write_text('{"__version__": {"sentence_transformers": "2.0.0"}}')
    (path / "sentence_bert_config.json").write_text('{"max_seq_length": 128, "do_lower_case": false}')
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 32, "pooling_mode_mean_tokens": true}'
    )
    return path


# ---- the real model: SentenceTransformer(output) embeds like the in-process quantized model -----------------


@pytest.fixture(scope="module")
def minilm_int4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "int4"
    assert commands.main(["quantize", str(minilm_path()), "--bits", "4", "--output", str(out)]) == 0
    return out


def test_sentence_transformers_pipeline_matches_the_quantized_model(minilm_int4):
    from sentence_transformers import SentenceTransformer

    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
        assert (minilm_int4 / name).read_bytes() == (minilm_path() / name).read_bytes()
    assert (minilm_int4 / "1_Pooling" / "config.json").is_file()
    st = SentenceTransformer(str(minilm_int4), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
    embeddings = torch.as_tensor(st.encode(TEXTS, convert_to_numpy=True))

    model = AutoModel.from_pretrained(minilm_path(), quantization_config=SplitQuantConfig(bits=4)).eval()
    inputs = AutoTokenizer.from_pretrained(minilm_path())(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)


def test_the_card_keeps_the_base_models_metadata(minilm_int4):
    meta = ModelCard.load(minilm_int4 / "README.md").data.to_dict()
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["license"] == "apache-2.0" and meta["language"] == "en"
    assert "s2orc" in meta["datasets"] and "ms_marco" in meta["datasets"]
    assert meta["tags"][:3] == ["splitquant", "quantized", "int4"]
    assert {"sentence-transformers", "sentence-similarity"} <= set(meta["tags"])
    assert len(meta["tags"]) == len(set(meta["tags"]))
    assert "SentenceTransformer(" in (minilm_int4 / "README.md").read_text()


# ---- what is copied, on a tiny folder ----------------------------------------------------------------------


def test_tiny_folder_output_loads_as_the_same_pipeline(tmp_path):
    from sentence_transformers import SentenceTransformer

    src = _st_folder(tmp_path / "st")
    out = tmp_path / "int8"
    assert commands.main(["quantize", str(src), "--bits", "8", "--output", str(out)]) == 0
    assert {"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"} <= {
        p.name for p in out.iterdir()
    }
    st = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
    assert st.max_seq_length == 128
    norms = torch.as_tensor(st.encode(TEXTS, convert_to_numpy=True)).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(len(TEXTS)), atol=1e-5, rtol=0)


def test_only_data_files_of_listed_modules_are_copied(tmp_path, caplog):
    src = _st_folder(tmp_path / "st")
    (src / "1_Pooling" / "pooling.py").write_text("import os\n")
    (src / "1_Pooling" / "extra.bin").write_bytes(b"\x80\x04pickle")
    (src / "1_Pooling" / "sub").mkdir()
    (src / "1_Pooling" / "sub" / "vocab.txt").write_text("a\nb\n")
    (src / "3_Unlisted").mkdir()
    (src / "3_Unlisted" / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="optimum_splitquant"):
        files = sentence_files(src)
    assert list(files) == [
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "1_Pooling/sub/vocab.txt",
    ]
    assert "1_Pooling/extra.bin is not copied" in caplog.text and "1_Pooling/pooling.py is not copied" in caplog.text
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "modules.json").write_text("saved by the model itself")
    copy_sentence_files(src, files, dst)
    assert (dst / "modules.json").read_text() == "saved by the model itself"  # never overwritten
    assert (dst / "1_Pooling" / "sub" / "vocab.txt").read_text() == "a\nb\n"
    assert not (dst / "3_Unlisted").exists() and not (dst / "1_Pooling" / "pooling.py").exists()


def test_a_folder_without_modules_json_has_none(tmp_path):
    torch.manual_seed(0)
    assert sentence_files(Path(_save(BertModel(_bert_config()), tmp_path / "plain"))) == {}


@pytest.mark.parametrize(
    ("path", "expected"),
    [("../outside", "leaves the model folder"), ("/etc", "leaves the model folder"), ("a/../../b", "leaves")],
    ids=["dotdot", "absolute", "nested-dotdot"],
)
def test_module_paths_outside_the_folder_are_refused(path, expected, tmp_path):
    src = _st_folder(tmp_path / "st", [*MODULES[:1], {"path": path, "type": "sentence_transformers.models.Dense"}])
    with pytest.raises(CliError, match=expected):
        sentence_files(src)


@pytest.mark.parametrize(
    "content",
    ["not json", '{"path": "1_Pooling"}', '[{"idx": 1}]', '[{"path": 3}]'],
    ids=["not-json", "not-a-list", "no-path", "path-not-a-string"],
)
def test_a_malformed_modules_json_is_a_clear_error(content, tmp_path):
    src = _st_folder(tmp_path / "st")
    (src / "modules.json").write_text(content)
    with pytest.raises(CliError, match=r"modules\.json"):
        sentence_files(src)


def test_symbolic_links_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    linked_folder = _st_folder(tmp_path / "a")
    os.rename(linked_folder / "1_Pooling", tmp_path / "pooling")
    (linked_folder / "1_Pooling").symlink_to(tmp_path / "pooling", target_is_directory=True)
    with pytest.raises(CliError, match="is a symbolic link"):
        sentence_files(linked_folder)
    linked_file = _st_folder(tmp_path / "b")
    (linked_file / "1_Pooling" / "secret.json").symlink_to(outside / "config.json")
    with pytest.raises(CliError, match=r"secret.json' is a symbolic link"):
        sentence_files(linked_file)


def _as_hub_cache(built: Path, repo: Path) -> Path:
    """Move the files of ``built`` into a Hugging Face cache layout: snapshot links to blobs."""
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    for i, path in enumerate(sorted(p for p in built.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        os.replace(path, blob)
        link = snapshot / path.relative_to(built)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_a_hub_cache_snapshot_is_read_through_its_blob_links(tmp_path):
    snapshot = _as_hub_cache(_st_folder(tmp_path / "built"), tmp_path / "models--me--st")
    assert "1_Pooling/config.json" in sentence_files(snapshot)


def test_a_hub_model_gets_its_files_from_the_hub(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from optimum_splitquant.cli.sentence_files import hub_sentence_folder

    snapshot = _as_hub_cache(_st_folder(tmp_path / "built"), tmp_path / "models--me--st")
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        if repo_id != "me/st":
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(snapshot / filename)

    def fake_snapshot(repo_id, allow_patterns=(), **kwargs):
        asked.extend(allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert hub_sentence_folder("me/plain-bert") is None
    folder = hub_sentence_folder("me/st")
    assert folder == snapshot and "1_Pooling/config.json" in sentence_files(folder)
    assert {"modules.json", "sentence_*_config.json", "1_Pooling/*.json", "2_Normalize/*.safetensors"} <= set(asked)
    assert not any(p.endswith((".bin", ".py", ".pkl")) for p in asked)


def test_a_transformer_outside_the_root_copies_nothing(tmp_path, caplog):
    modules = [{"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}, MODULES[1]]
    src = _st_folder(tmp_path / "st", modules)
    with caplog.at_level(logging.WARNING, logger="optimum_splitquant"):
        assert sentence_files(src) == {}
    assert "not in the folder root" in caplog.text


def test_the_cli_refuses_a_bad_modules_json_before_writing(tmp_path, capsys):
    src = _st_folder(tmp_path / "st", [*MODULES[:1], {"path": "../x", "type": "sentence_transformers.models.Dense"}])
    before = _snapshot(src)
    assert commands.main(["quantize", str(src), "--bits", "2", "--output", str(tmp_path / "out")]) == 1
    _assert_one_error_line(capsys.readouterr().err, "names the module path '../x', which leaves the model folder")
    assert not (tmp_path / "out").exists() and _snapshot(src) == before


# ---- module paths naming the folder root ------------------------------------------------------------------


@pytest.mark.parametrize("root", ["", ".", "./"], ids=["empty", "dot", "dot-slash"])
def test_the_transformer_in_the_root_is_skipped_however_written(root, tmp_path):
    src = _st_folder(tmp_path / "st", [{**MODULES[0], "path": root}, *MODULES[1:]])
    (src / "notes.json").write_text('{"private": true}')
    assert list(sentence_files(src)) == [
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ]


@pytest.mark.parametrize("root", ["", ".", "./"], ids=["empty", "dot", "dot-slash"])
def test_a_later_module_in_the_root_is_refused(root, tmp_path):
    src = _st_folder(tmp_path / "st", [MODULES[0], {**MODULES[1], "path": root}, MODULES[2]])
    with pytest.raises(
        CliError, match=r"places module 1 \(sentence_transformers\.models\.Pooling\) in the model folder"
    ):
        sentence_files(src)


def test_the_cli_never_copies_the_root_for_a_module_placed_there(tmp_path, capsys):
    src = _st_folder(tmp_path / "st", [MODULES[0], {**MODULES[1], "path": "."}, MODULES[2]])
    (src / "private.txt").write_text("secret\n")
    before = _snapshot(src)
    out = tmp_path / "out"
    assert commands.main(["quantize", str(src), "--bits", "8", "--output", str(out)]) == 1
    _assert_one_error_line(capsys.readouterr().err, "places module 1 (sentence_transformers.models.Pooling)")
    assert not out.exists() and _snapshot(src) == before


def test_a_transformer_at_dot_keeps_the_pipeline_and_a_checkable_output(tmp_path):
    from sentence_transformers import SentenceTransformer

    from optimum_splitquant import verify_checkpoint

    src = _st_folder(tmp_path / "st", [{**MODULES[0], "path": "."}, *MODULES[1:]])
    (src / "private.txt").write_text("secret\n")
    out = tmp_path / "int8"
    assert commands.main(["quantize", str(src), "--bits", "8", "--output", str(out)]) == 0
    assert (out / "1_Pooling" / "config.json").is_file() and not (out / "private.txt").exists()
    verify_checkpoint(out, load=False)
    st = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]


# ---- a file swapped for a symbolic link between the check and the copy ---------------------------------------


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "config.json").write_text('{"password": "hunter2"}')
    return secret


def _swap_for_link(src: Path, secret: Path, what: str) -> None:
    """Replace the pooling config (or its whole folder) by a symbolic link to ``secret``'s."""
    if what == "file":
        (src / "1_Pooling" / "config.json").unlink()
        (src / "1_Pooling" / "config.json").symlink_to(secret / "config.json")
    else:
        os.rename(src / "1_Pooling", src.parent / "pooling-moved")
        (src / "1_Pooling").symlink_to(secret, target_is_directory=True)


SWAPS = [("file", "by a symbolic link"), ("folder", "by another file")]


@pytest.mark.parametrize(("what", "how"), SWAPS, ids=["file", "folder"])
def test_a_file_swapped_for_a_link_while_the_model_loads_is_refused(what, how, tmp_path, monkeypatch, capsys):
    src, secret = _st_folder(tmp_path / "st"), _secret(tmp_path)
    real_load = quantize._load_quantized

    def load_while_swapping(*args, **kwargs):
        _swap_for_link(src, secret, what)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(quantize, "_load_quantized", load_while_swapping)
    out = tmp_path / "out"
    assert commands.main(["quantize", str(src), "--bits", "8", "--output", str(out)]) == 1
    _assert_one_error_line(
        capsys.readouterr().err,
        f"'{src / '1_Pooling' / 'config.json'}' was replaced after it was checked (before the model loaded), {how};",
    )
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging folder left


@pytest.mark.parametrize(("what", "how"), SWAPS, ids=["file", "folder"])
def test_copy_refuses_a_file_swapped_since_the_check(what, how, tmp_path):
    src, secret = _st_folder(tmp_path / "st"), _secret(tmp_path)
    files = sentence_files(src)
    _swap_for_link(src, secret, what)
    dst = tmp_path / "out"
    dst.mkdir()
    with pytest.raises(CliError, match=f"1_Pooling/config.json' was replaced after it was checked .*, {how}"):
        copy_sentence_files(src, files, dst)
    assert not any("hunter2" in p.read_text() for p in dst.rglob("*") if p.is_file())


def test_copy_refuses_a_hub_snapshot_link_pointed_at_another_blob(tmp_path):
    snapshot = _as_hub_cache(_st_folder(tmp_path / "built"), tmp_path / "models--me--st")
    files = sentence_files(snapshot)
    link = snapshot / "1_Pooling" / "config.json"
    other_blob = (snapshot / "sentence_bert_config.json").resolve()
    link.unlink()
    link.symlink_to(os.path.relpath(other_blob, link.parent))
    dst = tmp_path / "out"
    dst.mkdir()
    with pytest.raises(CliError, match=r"1_Pooling/config.json' was replaced after it was checked .*, by another file"):
        copy_sentence_files(snapshot, files, dst)
    assert not (dst / "1_Pooling" / "config.json").exists()
