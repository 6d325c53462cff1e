"""The start-up hook: a process that never imports optimum_splitquant still loads SplitQuant checkpoints.

Each child process starts from the installed ``optimum_splitquant-autoload.pth`` (as any user's
process would), so these tests also check that the install put the file into site-packages.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import load, run

import _optimum_splitquant_autoload as autoload
from optimum_splitquant import SplitQuantConfig
from optimum_splitquant.hf import QUANT_METHOD

NAME = "bert-seqcls"


def _child(script: str, tmp_path: Path, *, opt_out: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter (cwd outside the repository), return it after it exits."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(autoload.OPT_OUT_ENV, None)
    if opt_out:
        env[autoload.OPT_OUT_ENV] = "1"
    cmd = [sys.executable, "-c", textwrap.dedent(script)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=300)


@pytest.fixture(scope="module")
def saved(tiny_dirs, sample_inputs, tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    """A SplitQuant checkpoint, its inputs file, and the outputs of loading it in this process."""
    root = tmp_path_factory.mktemp("autoload")
    load(NAME, tiny_dirs[NAME], quantization_config=SplitQuantConfig(bits=3, group_size=16)).save_pretrained(root / "q")
    save_file({k: v.contiguous() for k, v in sample_inputs.items()}, str(root / "inputs.safetensors"))
    return root / "q", root / "inputs.safetensors", run(load(NAME, root / "q"), sample_inputs)


def test_startup_installs_only_the_finder(tmp_path):
    proc = _child(
        """
        import sys
        assert [type(f).__name__ for f in sys.meta_path].count("RegistryFinder") == 1, sys.meta_path
        heavy = {"torch", "transformers", "optimum_splitquant"} & set(sys.modules)
        assert not heavy, heavy
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


def test_load_without_import_matches_in_process_load(saved, tiny_dirs, tmp_path):
    """One child (torch and transformers take seconds to import) walks the whole life of the hook."""
    folder, inputs_file, expected = saved
    result = tmp_path / "out.safetensors"
    proc = _child(
        f"""
        import importlib, sys
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForSequenceClassification as Auto
        import transformers.quantizers.auto as registry

        def forward(model):
            with torch.no_grad():
                return model(**load_file({str(inputs_file)!r})).logits.contiguous()

        # transformers alone, and a float checkpoint, leave the plugin unimported.
        assert type(registry.AUTO_QUANTIZATION_CONFIG_MAPPING["splitquant"]).__name__ == "_Deferred"
        Auto.from_pretrained({tiny_dirs[NAME]!r})
        assert "optimum_splitquant" not in sys.modules
        # A plugin that cannot be imported stops the load instead of leaving random weights.
        sys.modules["optimum_splitquant"] = None
        try:
            Auto.from_pretrained({str(folder)!r})
            raise AssertionError("a SplitQuant checkpoint loaded without its plugin")
        except ImportError as exc:
            assert "could not be imported" in str(exc), exc
        del sys.modules["optimum_splitquant"]
        # The first SplitQuant checkpoint imports the plugin, which registers the real classes.
        out = forward(Auto.from_pretrained({str(folder)!r}).eval())
        assert "optimum_splitquant" in sys.modules
        assert registry.AUTO_QUANTIZER_MAPPING["splitquant"].__name__ == "SplitQuantHfQuantizer"
        # A reloaded registry gets the stand-ins again, and they re-register the imported package.
        importlib.reload(registry)
        assert type(registry.AUTO_QUANTIZATION_CONFIG_MAPPING["splitquant"]).__name__ == "_Deferred"
        assert torch.equal(forward(Auto.from_pretrained({str(folder)!r}).eval()), out)
        save_file({{"out": out}}, {str(result)!r})
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(str(result))["out"], expected)


@pytest.mark.slow  # a fresh process; test_opt_out_values checks the switch in process
def test_opt_out_gives_transformers_plain_behaviour(saved, tmp_path):
    folder, _, _ = saved
    proc = _child(
        f"""
        import sys
        from transformers import AutoModelForSequenceClassification as Auto
        model = Auto.from_pretrained({str(folder)!r})
        assert "optimum_splitquant" not in sys.modules
        assert not any(n.endswith("weight_packed") for n, _ in model.named_buffers())
        """,
        tmp_path,
        opt_out=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Unknown quantization type, got splitquant" in proc.stderr


def test_quant_method_matches_the_package():
    assert autoload.QUANT_METHOD == QUANT_METHOD


@pytest.mark.parametrize(
    ("value", "on"), [("", True), ("0", True), ("false", True), ("1", False), ("yes", False)], ids=repr
)
def test_opt_out_values(monkeypatch, value, on):
    monkeypatch.setenv(autoload.OPT_OUT_ENV, value)
    assert autoload.enabled() is on


def test_install_adds_one_finder_unless_opted_out(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, autoload.RegistryFinder)])
    monkeypatch.setenv(autoload.OPT_OUT_ENV, "1")
    autoload.install()
    assert not any(isinstance(f, autoload.RegistryFinder) for f in sys.meta_path)
    monkeypatch.delenv(autoload.OPT_OUT_ENV)
    autoload.install()
    autoload.install()
    assert isinstance(sys.meta_path[0], autoload.RegistryFinder)
    assert sum(isinstance(f, autoload.RegistryFinder) for f in sys.meta_path) == 1


def test_unexpected_registry_warns_and_leaves_it_alone(caplog):
    registry = types.ModuleType("registry")
    registry.AUTO_QUANTIZATION_CONFIG_MAPPING = {}
    with caplog.at_level(logging.WARNING, logger="optimum_splitquant.autoload"):
        autoload.register_stand_ins(registry)
    assert "import optimum_splitquant" in caplog.text
    assert registry.AUTO_QUANTIZATION_CONFIG_MAPPING == {}


def test_finder_error_falls_back_to_the_normal_import(monkeypatch, caplog):
    class Broken:
        def find_spec(self, *args):
            raise RuntimeError("boom")

    finder = autoload.RegistryFinder()
    monkeypatch.setattr(sys, "meta_path", [finder, Broken()])
    assert finder.find_spec("json") is None
    with caplog.at_level(logging.WARNING, logger="optimum_splitquant.autoload"):
        assert finder.find_spec(autoload.REGISTRY_MODULE) is None
    assert "boom" in caplog.text


@pytest.mark.parametrize("name", [autoload.PEFT_MODULE, autoload.PACKAGE])
def test_finder_connects_peft_after_peft_or_the_package_loads(name):
    spec = autoload.RegistryFinder().find_spec(name)
    assert spec is not None and spec.loader.after is autoload.connect_peft


def _fake_module(name: str, *, initializing: bool = False) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = types.SimpleNamespace(_initializing=initializing)
    return module


@pytest.mark.parametrize("peft_state", ["absent", "initializing"])
def test_connect_peft_waits_for_both(monkeypatch, peft_state):
    """The package alone (or with peft still loading) imports nothing: a SplitQuant layer cannot meet PEFT yet."""
    monkeypatch.delitem(sys.modules, autoload.PEFT_GLUE, raising=False)
    if peft_state == "absent":
        monkeypatch.delitem(sys.modules, autoload.PEFT_MODULE, raising=False)
    else:
        monkeypatch.setitem(sys.modules, autoload.PEFT_MODULE, _fake_module("peft", initializing=True))
    autoload.connect_peft(_fake_module(autoload.PACKAGE))
    assert autoload.PEFT_GLUE not in sys.modules


def test_connect_peft_warns_when_the_glue_cannot_be_imported(monkeypatch, caplog):
    pytest.importorskip("peft")
    monkeypatch.setitem(sys.modules, autoload.PEFT_GLUE, None)  # makes the import fail
    with caplog.at_level(logging.WARNING, logger="optimum_splitquant.autoload"):
        autoload.connect_peft(sys.modules[autoload.PEFT_MODULE])
    assert "Plain PEFT cannot adapt SplitQuant layers" in caplog.text and autoload.PEFT_GLUE in caplog.text


def test_stand_ins_resolve_to_the_real_classes(tmp_path):
    from optimum_splitquant.hf import SplitQuantHfQuantizer

    config = autoload.DeferredSplitQuantConfig.from_dict({"quant_method": "splitquant", "bits": 4})
    assert isinstance(config, SplitQuantConfig) and config.bits == 4
    assert isinstance(autoload.DeferredSplitQuantHfQuantizer(config, pre_quantized=True), SplitQuantHfQuantizer)
    with pytest.raises(AttributeError):
        autoload.DeferredSplitQuantConfig.__wrapped__  # noqa: B018
