"""End to end: a tiny SplitQuant Llama saved by transformers, served by ``vllm.LLM``, same greedy tokens.

The model (4 attention heads, 2 KV heads, coded ranges with 3 clusters) is quantized and saved by
transformers in a temporary folder; vLLM serves it in a subprocess (the CPU build needs its OpenMP
runtime preloaded and spawns engine processes) with tensor parallel size 1 and 2. Each run is bounded
by a timeout; the engine start dominates (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: tests/vllm run in .venv-vllm (bash scripts/install_vllm.sh)")

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from optimum_splitquant import SplitQuantConfig

SERVE = Path(__file__).with_name("serve_greedy.py")
PROMPTS = [[1, 17, 42, 99, 5], [1, 250, 3, 77, 120, 8, 64]]
MAX_TOKENS = 8
TIMEOUT_S = 900
SETTINGS = {"bits": 3, "num_clusters": 3, "group_size": 16, "fit": "mse", "range_bits": 6}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """A SplitQuant Llama saved by transformers, and its greedy tokens from transformers."""
    root = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,  # head_dim 64: vLLM's CPU attention has no kernel for head_dim 16
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaked logits: no near-ties for greedy decoding to break differently
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "float")
    quantized = AutoModelForCausalLM.from_pretrained(
        root / "float", quantization_config=SplitQuantConfig(**SETTINGS), dtype=torch.float32
    )
    quantized.save_pretrained(root / "splitquant")
    reloaded = AutoModelForCausalLM.from_pretrained(root / "splitquant", dtype=torch.float32)
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        out = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
        expected.append(out[0, len(prompt) :].tolist())
    return root / "splitquant", expected


def _serve(model: Path, tp: int) -> list[list[int]]:
    env = dict(os.environ)
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists():  # the CPU build's OpenMP runtime must be loaded first
        env["LD_PRELOAD"] = " ".join(p for p in (str(iomp), env.get("LD_PRELOAD", "")) if p)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if tp > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp)))
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py for the kernels' tests; not for vLLM
    cmd = [sys.executable, str(SERVE), str(model), str(tp), str(MAX_TOKENS), json.dumps(PROMPTS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("GREEDY ")]
    assert proc.returncode == 0 and lines, f"vLLM failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1].removeprefix("GREEDY "))


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_vllm_serves_the_same_greedy_tokens(tiny_llama: tuple[Path, list[list[int]]], tp: int) -> None:
    model, expected = tiny_llama
    assert _serve(model, tp) == expected
