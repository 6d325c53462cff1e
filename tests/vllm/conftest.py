"""Shared set-up of tests/vllm: a vLLM config context, a faked tensor parallel group, and for the
end-to-end tests a tiny SplitQuant Llama folder with its transformers greedy tokens and the environment
of a vLLM subprocess.

These tests need vLLM (``.venv-vllm``, made by ``scripts/install_vllm.sh``); each module skips itself
with that reason when vLLM is not importable, so the main suite in ``.venv`` passes without it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

import pytest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from optimum_splitquant import SplitQuantConfig

VLLM_MISSING = "vLLM is not installed: tests/vllm run in .venv-vllm (bash scripts/install_vllm.sh)"


@contextlib.contextmanager
def tensor_parallel(size: int, rank: int) -> Iterator[None]:
    """vLLM's layers and parameters see a tensor parallel group of ``size`` in which this process is ``rank``."""
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    with contextlib.ExitStack() as stack:
        for module in (linear, parameter):
            stack.enter_context(mock.patch.object(module, "get_tensor_model_parallel_world_size", return_value=size))
            stack.enter_context(mock.patch.object(module, "get_tensor_model_parallel_rank", return_value=rank))
        yield


@pytest.fixture(scope="module")
def vllm_context() -> Iterator[None]:
    """vLLM layers are built inside a current ``VllmConfig`` (a default one: no engine)."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from optimum_splitquant.vllm import register

    register()
    with set_current_vllm_config(VllmConfig()):
        yield


# A tiny Llama (4 attention heads, 2 KV heads: tensor parallel 2 works) whose tokenizer maps the words
# "<unk>", "<s>", "</s>", "w3" ... "w255" to their ids; prompts are token ids (id 1 is "<s>").
TINY_PROMPTS = [[1, 17, 42, 99, 5], [1, 250, 3, 77, 120, 8, 64]]
TINY_MAX_TOKENS = 8
TINY_SETTINGS = {"bits": 3, "num_clusters": 3, "group_size": 16, "fit": "mse", "range_bits": 6}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the tiny Llama's 256 ids (``decode`` joins words with spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """A SplitQuant Llama (:data:`TINY_SETTINGS`: coded ranges, 3 clusters) saved by transformers, and its
    greedy tokens from transformers."""
    from optimum_splitquant import SplitQuantConfig

    return _tiny_llama(tmp_path_factory.mktemp("tiny_llama"), SplitQuantConfig(**TINY_SETTINGS))


@pytest.fixture(scope="module")
def tiny_llama_budget(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """The tiny Llama quantized with ``SplitQuantConfig.for_budget(4.5)`` (format 4: column scales on every
    layer), saved by transformers, and its greedy tokens from transformers."""
    from optimum_splitquant import SplitQuantConfig

    config = SplitQuantConfig.for_budget(4.5)
    assert config.column_scales and config.format_version == 4
    return _tiny_llama(tmp_path_factory.mktemp("tiny_llama_budget"), config)


def _tiny_llama(root: Path, quantization_config: SplitQuantConfig) -> tuple[Path, list[list[int]]]:
    """The tiny Llama quantized with ``quantization_config`` and saved (with its tokenizer) under ``root``;
    its folder and its greedy tokens from transformers."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

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
        root / "float", quantization_config=quantization_config, dtype=torch.float32
    )
    quantized.save_pretrained(root / "splitquant")
    tiny_tokenizer().save_pretrained(root / "splitquant")
    reloaded = AutoModelForCausalLM.from_pretrained(root / "splitquant", dtype=torch.float32)
    # As vLLM's ignore_eos: always TINY_MAX_TOKENS tokens, "</s>" included. generate() fills a generation
    # config's unset fields from the model's own, so the model's loses its end-of-sequence token.
    reloaded.generation_config.eos_token_id = None
    expected = []
    for prompt in TINY_PROMPTS:
        ids = torch.tensor([prompt])
        out = reloaded.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=TINY_MAX_TOKENS, do_sample=False
        )
        expected.append(out[0, len(prompt) :].tolist())
    assert all(len(tokens) == TINY_MAX_TOKENS for tokens in expected), expected
    return root / "splitquant", expected


def vllm_subprocess_env(tp: int = 1) -> dict[str, str]:
    """Environment of a vLLM CPU subprocess: its OpenMP runtime preloaded, 1 GiB of KV cache, one core per TP rank."""
    env = dict(os.environ)
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists():  # the CPU build's OpenMP runtime must be loaded first, and no other one
        # Building a VllmConfig in this process (the layer tests) adds torch's libgomp to os.environ's
        # LD_PRELOAD; vLLM refuses an engine whose LD_PRELOAD names two OpenMP runtimes.
        inherited = env.get("LD_PRELOAD", "").replace(":", " ").split()
        others = [p for p in inherited if not any(omp in Path(p).name for omp in ("libgomp", "libiomp", "libomp"))]
        env["LD_PRELOAD"] = " ".join([str(iomp), *others])
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if tp > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp)))
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py for the kernels' tests; not for vLLM
    return env
