"""``optimum-cli splitquant``: registered with optimum-cli by the installed package, the same commands as ours."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from optimum.commands.base import RootOptimumCLICommand
from optimum.commands.optimum_cli import register_optimum_cli_subcommand
from optimum.commands.register import register_splitquant
from transformers import AutoTokenizer, BertConfig, BertModel

from optimum_splitquant import SplitQuantConfig
from optimum_splitquant.cli import commands
from optimum_splitquant.cli.data import minilm_path

OPTIMUM_CLI = Path(sys.executable).with_name("optimum-cli")
REINSTALL = "optimum-cli does not know splitquant: reinstall the package (pip install -e .)"
# What optimum-quanto 0.2.7 (the `quanto` and `bench` extras) logs at every optimum-cli start under optimum 2.
QUANTO_0_2_7 = (
    "An exception occurred while loading optimum.quanto.subpackage: cannot import name 'BaseOptimumCLICommand' "
    "from 'optimum.commands' (unknown location)."
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return str(path)


def _optimum_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed ``optimum-cli``, run away from the repository (so only an installed registration counts)."""
    assert OPTIMUM_CLI.is_file(), f"no {OPTIMUM_CLI}: optimum is not installed in this environment"
    return subprocess.run([str(OPTIMUM_CLI), *argv], capture_output=True, text=True, check=False, cwd=cwd)


def _root() -> RootOptimumCLICommand:
    """optimum-cli's root command with ``splitquant`` registered, as ``optimum-cli`` builds it."""
    root = RootOptimumCLICommand("Optimum CLI tool", usage="optimum-cli")
    for command in register_splitquant.REGISTER_COMMANDS:
        register_optimum_cli_subcommand(command, parent_command=root)
    return root


def _run(argv: list[str]) -> None:
    """Parse ``argv`` as ``optimum-cli`` does, then run the command."""
    args = _root().parser.parse_args(argv)
    args.func(args).run()


# ---- the registration, in this process ------------------------------------------------------------


def test_registration_lists_the_cli_commands():
    parser = commands._parser()
    ours = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert [name for name, _ in register_splitquant.COMMANDS] == list(ours)


def test_registration_imports_nothing_heavy():
    code = (
        "import sys; import optimum.commands.register.register_splitquant; "
        "print(sorted(m for m in ('torch', 'transformers', 'optimum_splitquant') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_arguments_go_to_our_parser_and_handler(monkeypatch):
    seen = []

    def fake_quantize(args):
        seen.append(args)
        return 0

    monkeypatch.setattr(commands, "cmd_quantize", fake_quantize)
    with pytest.raises(SystemExit) as exc:
        _run(["splitquant", "quantize", "M", "--budget", "4.5", "--range-block", "16", "--output", "o", "-v"])
    assert exc.value.code == 0
    (args,) = seen
    assert (args.model, args.budget, args.bits, args.range_block, args.output) == ("M", 4.5, None, 16, "o")


def test_errors_name_optimum_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _run(["splitquant", "quantize", str(tmp_path / "missing"), "--bits", "2", "--output", str(tmp_path / "o")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"optimum-cli splitquant: error: model path '{tmp_path / 'missing'}' does not exist"
    with pytest.raises(SystemExit) as exc:
        _run(["splitquant", "quantize", "M", "--output", "o"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: optimum-cli splitquant quantize")
    assert err.splitlines()[-1].endswith("one of the arguments --budget --bits is required")


def test_optimum_cli_help_lists_splitquant():
    lines = _root().parser.format_help().splitlines()
    assert ["splitquant", "SplitQuant", "low-bit", "weight", "quantization"] in [line.split() for line in lines]


def test_no_command_shows_the_help(capsys):
    _run(["splitquant"])
    out = capsys.readouterr().out
    assert out.startswith("usage: optimum-cli splitquant")
    assert all(f"  {name}" in out for name, _ in register_splitquant.COMMANDS)


# ---- the installed optimum-cli ----------------------------------------------------------------------


@pytest.mark.slow  # a second optimum-cli process; the quantize case below runs the same entry point
def test_optimum_cli_splitquant_help(tmp_path):
    proc = _optimum_cli("splitquant", "--help", cwd=tmp_path)
    assert proc.returncode == 0, f"{REINSTALL}\n{proc.stderr}"
    assert proc.stdout.startswith("usage: optimum-cli splitquant")
    assert "quantize MODEL --budget 4.5 --output DIR" in proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.strip() and line != QUANTO_0_2_7] == []


def test_optimum_cli_quantizes_a_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "int4"
    proc = _optimum_cli("splitquant", "quantize", tiny_model, "--budget", "4.5", "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "budget     4.5 bits per weight asked for" in proc.stdout
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    expected = SplitQuantConfig.for_budget(4.5).to_dict()
    assert {k: saved[k] for k in expected if k != "modules_to_not_convert"} == {
        k: v for k, v in expected.items() if k != "modules_to_not_convert"
    }
    assert {"model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
