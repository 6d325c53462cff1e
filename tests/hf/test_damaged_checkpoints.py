"""The damaged-checkpoint matrix: every case ends in a clear error or a documented, tested warning.

No case may return a model that runs with random or wrong weights.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import load, rewrite_weights, run
from torch import nn

import optimum_splitquant as osq
from optimum_splitquant import FORMAT_VERSION, SplitQuantConfig
from optimum_splitquant.core import QuantSpec
from optimum_splitquant.nn import SplitQuantLinear

NAME = "bert-seqcls"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_dirs):
    """A SplitQuant INT2 checkpoint of the tiny BERT classifier: 2 x 6 encoder Linear + pooler (read-only)."""
    path = tmp_path_factory.mktemp("q-bert")
    load(NAME, tiny_dirs[NAME], quantization_config=SplitQuantConfig(bits=2)).save_pretrained(path)
    return path


@pytest.fixture
def copy_of(saved, tmp_path):
    dest = tmp_path / "ckpt"
    shutil.copytree(saved, dest)
    return dest


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def expect_refused(folder: Path, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load(NAME, folder)
    with pytest.raises(ValueError):
        osq.verify_checkpoint(folder)


def test_intact_checkpoint_verifies(saved):
    report = osq.verify_checkpoint(saved)
    assert report.quantized_layers == 13 and report.files == ("model.safetensors",)
    assert report.config.bits == 2 and 4.0 < report.effective_bits < 7.0


def test_missing_tensor(copy_of):
    rewrite_weights(copy_of, lambda t: t.pop("bert.encoder.layer.1.intermediate.dense.weight_offset"))
    expect_refused(copy_of, r"missing tensor 'bert\.encoder\.layer\.1\.intermediate\.dense\.weight_offset'")


def test_wrong_shape(copy_of):
    key = "bert.encoder.layer.0.attention.self.value.weight_scale"
    rewrite_weights(copy_of, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    expect_refused(copy_of, r"value\.weight_scale.*has shape \[31, 1, 3\].*expected shape \[32, 1, 3\]")


def test_wrong_dtype(copy_of):
    key = "bert.encoder.layer.0.attention.self.value.weight_packed"
    rewrite_weights(copy_of, lambda t: t.__setitem__(key, t[key].to(torch.int16)))
    expect_refused(copy_of, r"value\.weight_packed.*dtype I16.*\['U8'\]")


def test_cluster_id_out_of_range(copy_of):
    key = "bert.encoder.layer.1.output.dense.weight_packed"
    rewrite_weights(copy_of, lambda t: t[key].__setitem__((3, 5), 0xF3))  # high nibble: id 3 with k = 3
    expect_refused(copy_of, r"output\.dense: weight_packed holds cluster id 3")


def test_cluster_id_in_the_padding_of_a_row():
    """Rows pad to 8 symbols with zero symbols; a nonzero id there is damage too, named as such."""
    layer = SplitQuantLinear.from_float(nn.Linear(13, 4), QuantSpec(2, 3))
    layer.validate()
    with torch.no_grad():
        layer.weight_packed[1, 7] |= 0xC0  # width 4: byte 7 holds symbols 14 and 15 (padding); id 3 in 15
    with pytest.raises(ValueError, match=r"weight_packed holds cluster id 3 in the padding after a row's last weight"):
        layer.validate()


def _fill_ranges(value: float):
    def edit(tensors):
        for key, tensor in tensors.items():
            if key.endswith((".weight_scale", ".weight_offset")):
                tensor.fill_(value)

    return edit


def test_weights_that_overflow_the_compute_dtype(copy_of, sample_inputs):
    """Scales and offsets at the largest float16 rebuild weights up to 4 x 65504: finite in float32 only."""
    rewrite_weights(copy_of, _fill_ranges(65504.0))
    with pytest.raises(
        ValueError,
        match=r"bert\.encoder\.layer\.0\.attention\.self\.query: weight_scale and weight_offset rebuild weights of "
        r"magnitude up to 262016, which overflow torch\.float16 .* load it with dtype=torch\.float32",
    ):
        load(NAME, copy_of, dtype=torch.float16)
    assert torch.isfinite(run(load(NAME, copy_of), sample_inputs)).all()


def test_scale_dtype_that_disagrees_with_the_stored_scales(copy_of):
    edit_config(copy_of, lambda c: c["quantization_config"].update(scale_dtype="bfloat16"))
    expect_refused(
        copy_of,
        r"tensor 'bert\.[\w.]+\.weight_(scale|offset)' in model\.safetensors is stored as F16 \(float16\) but "
        r"config\.json quantization_config\.scale_dtype is 'bfloat16'",
    )
    with pytest.raises(ValueError, match=r"config\.json quantization_config\.scale_dtype is 'bfloat16'"):
        osq.verify_checkpoint(copy_of, load=False)


def test_truncated_file(copy_of):
    path = copy_of / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_refused(copy_of, r"model\.safetensors: not a readable safetensors file")


def test_stripped_quantization_config_warns_and_verify_refuses(copy_of, sample_inputs, caplog):
    """transformers loads float layers with random weights and only logs; the plugin cannot stop that."""
    edit_config(copy_of, lambda c: c.pop("quantization_config"))
    with caplog.at_level("WARNING"):
        model = load(NAME, copy_of)
    assert "MISSING" in caplog.text and "weight" in caplog.text  # the documented warning: the load report
    assert not getattr(model, "is_quantized", False)
    with pytest.raises(ValueError, match="no quantization_config"):
        osq.verify_checkpoint(copy_of)


def test_quantizing_a_checkpoint_that_is_already_quantized(copy_of):
    edit_config(copy_of, lambda c: c.pop("quantization_config"))
    with pytest.raises(ValueError, match="already holds SplitQuant tensors"):
        load(NAME, copy_of, quantization_config=SplitQuantConfig(bits=2))


def test_splitquant_config_over_float_weights(tiny_dirs, tmp_path):
    folder = tmp_path / "float"
    shutil.copytree(tiny_dirs[NAME], folder)
    edit_config(folder, lambda c: c.__setitem__("quantization_config", SplitQuantConfig(bits=2).to_dict()))
    expect_refused(folder, "holds no SplitQuant tensors")


def test_config_from_another_save(copy_of):
    edit_config(copy_of, lambda c: c["quantization_config"].update(bits=4, num_clusters=1))
    expect_refused(copy_of, "config.json and the weights come from different saves")


def test_unknown_format_version(copy_of):
    newer = FORMAT_VERSION + 1
    edit_config(copy_of, lambda c: c["quantization_config"].update(format_version=newer))
    expect_refused(copy_of, f"format_version {newer} was written by a newer optimum-splitquant")


def test_unknown_config_key(copy_of):
    edit_config(copy_of, lambda c: c["quantization_config"].update(sparsity=0.5))
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['sparsity'\]"):
        load(NAME, copy_of)


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/optimum_splitquant_pickle_was_executed")


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(copy_of):
    MARKER.unlink(missing_ok=True)
    (copy_of / "model.safetensors").unlink()
    with open(copy_of / "pytorch_model.bin", "wb") as f:
        pickle.dump({"payload": _Boom()}, f)
    expect_refused(copy_of, "reads only safetensors")
    assert not MARKER.exists(), "a pickle from the checkpoint was executed"


def test_nan_weights_are_refused_with_the_layer_name(tiny_dirs, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(tiny_dirs[NAME], folder)
    key = "bert.encoder.layer.1.attention.self.key.weight"
    rewrite_weights(folder, lambda t: t[key].__setitem__((2, 3), float("inf")))
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.attention\.self\.key: weight contains NaN or inf"):
        load(NAME, folder, quantization_config=SplitQuantConfig(bits=2))


def test_loading_without_the_plugin_is_loud(saved):
    """Documented: with the start-up hook off and no `import optimum_splitquant`, transformers warns and
    builds random float layers."""
    script = textwrap.dedent(
        f"""
        from transformers import AutoModelForSequenceClassification
        AutoModelForSequenceClassification.from_pretrained({str(saved)!r})
        """
    )
    env = {**os.environ, "OPTIMUM_SPLITQUANT_NO_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert "Unknown quantization type" in proc.stderr + proc.stdout
    assert "MISSING" in proc.stderr + proc.stdout


# ---- interrupted saves ---------------------------------------------------------------------------


def _interrupting_save(monkeypatch, after: int, how: str = "raise"):
    """Make transformers' shard writer stop the save after ``after`` shards."""
    import transformers.modeling_utils as mu

    real = mu.safe_save_file
    written = []

    def fake(tensors, filename, metadata=None):
        if len(written) >= after:
            if how == "kill":
                os.kill(os.getpid(), 9)
            raise KeyboardInterrupt("save interrupted")
        written.append(filename)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(mu, "safe_save_file", fake)


def _sharded_pair(tiny_dirs, folder):
    """Two different SplitQuant models with the same layout, the first saved (sharded) into ``folder``."""
    old = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=2))
    old.save_pretrained(folder, max_shard_size="300KB")
    new = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=2, num_clusters=4))
    return old, new


def test_interrupted_plain_save_never_loads_as_valid(tiny_dirs, sample_inputs, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    _, new = _sharded_pair(tiny_dirs, folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    _interrupting_save(monkeypatch, after=1)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder, max_shard_size="300KB")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="different saves"):
        load("llama-lm", folder)


def test_killed_plain_save_never_loads_as_valid(tiny_dirs, tmp_path):
    """A real SIGKILL in the middle of writing the shards of a save over an older checkpoint."""
    folder = tmp_path / "ckpt"
    _sharded_pair(tiny_dirs, folder)
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import transformers.modeling_utils as mu
        import optimum_splitquant
        from optimum_splitquant import SplitQuantConfig
        from tiny import load
        real, n = mu.safe_save_file, []
        def fake(tensors, filename, metadata=None):
            if n:
                os.kill(os.getpid(), 9)
            n.append(filename)
            real(tensors, filename, metadata=metadata)
        mu.safe_save_file = fake
        model = load("llama-lm", {tiny_dirs["llama-lm"]!r}, quantization_config=SplitQuantConfig(bits=2, num_clusters=4))
        model.save_pretrained({str(folder)!r}, max_shard_size="300KB")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    with pytest.raises(ValueError, match="different saves"):
        load("llama-lm", folder)


def test_interrupted_atomic_save_keeps_the_previous_checkpoint(
    tiny_dirs, tokenizer, sample_inputs, tmp_path, monkeypatch
):
    folder = tmp_path / "ckpt"
    old, new = _sharded_pair(tiny_dirs, folder)
    tokenizer.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _interrupting_save(monkeypatch, after=1)
    with pytest.raises(KeyboardInterrupt):
        osq.save_pretrained_atomic(new, folder, max_shard_size="300KB")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.saving-")], "staging folder left behind"
    assert torch.equal(run(load("llama-lm", folder), sample_inputs), run(old, sample_inputs))


def test_atomic_save_replaces_weights_and_keeps_other_files(tiny_dirs, tokenizer, sample_inputs, tmp_path):
    folder = tmp_path / "ckpt"
    _, new = _sharded_pair(tiny_dirs, folder)
    tokenizer.save_pretrained(folder)
    (folder / "notes.txt").write_text("kept")
    osq.save_pretrained_atomic(new, folder)  # unsharded this time: the old shards must not survive
    assert (folder / "notes.txt").read_text() == "kept" and (folder / "tokenizer.json").is_file()
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not (folder / "model.safetensors.index.json").exists()
    again = load("llama-lm", folder)
    assert again.config.quantization_config.num_clusters == 4
    assert torch.equal(run(again, sample_inputs), run(new, sample_inputs))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_ids_differ_between_saves_and_match_within_one(tiny_dirs, tmp_path):
    from safetensors import safe_open

    model = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=2))
    ids = []
    for folder in (tmp_path / "a", tmp_path / "b"):
        model.save_pretrained(folder, max_shard_size="300KB")
        per_shard = set()
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as f:
                per_shard.add(f.metadata()["splitquant_save_id"])
        assert len(per_shard) == 1
        ids.append(per_shard.pop())
    assert ids[0] != ids[1]
