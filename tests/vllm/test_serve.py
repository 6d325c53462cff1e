"""End to end: a tiny SplitQuant Llama saved by transformers, served by ``vllm.LLM``, same greedy tokens.

The model (conftest.py: 4 attention heads, 2 KV heads; ``tiny_llama`` with coded ranges and 3 clusters,
``tiny_llama_budget`` with ``for_budget(4.5)``: format 4, column scales on every layer) is quantized
and saved by transformers in a temporary folder; vLLM serves it in a subprocess (the CPU
build needs its OpenMP runtime preloaded and spawns engine processes) with tensor parallel size 1 and 2. Each run is bounded
by a timeout; the engine start dominates (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: tests/vllm run in .venv-vllm (bash scripts/install_vllm.sh)")

from .conftest import TINY_MAX_TOKENS, TINY_PROMPTS, vllm_subprocess_env

SERVE = Path(__file__).with_name("serve_greedy.py")
TIMEOUT_S = 900


def _serve(model: Path, tp: int) -> list[list[int]]:
    env = vllm_subprocess_env(tp)
    cmd = [sys.executable, str(SERVE), str(model), str(tp), str(TINY_MAX_TOKENS), json.dumps(TINY_PROMPTS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("GREEDY ")]
    assert proc.returncode == 0 and lines, f"vLLM failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1].removeprefix("GREEDY "))


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
@pytest.mark.parametrize("checkpoint", ["tiny_llama", "tiny_llama_budget"])
def test_vllm_serves_the_same_greedy_tokens(request: pytest.FixtureRequest, checkpoint: str, tp: int) -> None:
    model, expected = request.getfixturevalue(checkpoint)
    assert _serve(model, tp) == expected


def test_headers_of_another_format_than_config_json_are_refused(tiny_llama: tuple[Path, list[list[int]]]) -> None:
    """Coded ranges read differently in formats 2 and 3: config.json's version must be the headers' one."""
    from optimum_splitquant.vllm.config import SplitQuantVllmConfig

    settings = json.loads((tiny_llama[0] / "config.json").read_text())["quantization_config"]
    assert settings["format_version"] == 3
    config = SplitQuantVllmConfig.from_config({**settings, "format_version": 2})
    with pytest.raises(ValueError, match=r"written in format 3 but config.json says format_version 2"):
        config.maybe_update_config(str(tiny_llama[0]))
