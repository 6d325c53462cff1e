"""``SplitQuantizer.quantize(save_dir)`` saves the source's tokenizer beside the model: ``pipeline(model=save_dir)`` works."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny import TINY, load
from transformers import AutoTokenizer, GenerationConfig, pipeline

from optimum_splitquant import SplitQuantConfig, SplitQuantizer

TEXTS = ["the quick brown fox jumps over the lazy dog", "free entry to win a prize, text now"]


def _with_tokenizer(name: str, tokenizer_path: str, folder: Path) -> str:
    """A tiny float model ``name`` saved in ``folder`` with the real MiniLM tokenizer."""
    auto, make_config = TINY[name]
    torch.manual_seed(0)
    auto.from_config(make_config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def classifier_dir(tokenizer_path, tmp_path_factory) -> str:
    return _with_tokenizer("bert-seqcls", tokenizer_path, tmp_path_factory.mktemp("seqcls-with-tokenizer"))


def _tokenizer_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} & {"tokenizer.json", "tokenizer_config.json"}


def test_quantize_saves_the_tokenizer_for_pipeline(classifier_dir, tmp_path):
    out = tmp_path / "int4"
    model = SplitQuantizer.from_pretrained(classifier_dir).quantize(out, quantization_config=SplitQuantConfig(bits=4))
    assert _tokenizer_files(out) == {"tokenizer.json", "tokenizer_config.json"}
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.get_vocab() == AutoTokenizer.from_pretrained(classifier_dir).get_vocab()
    pipe = pipeline("text-classification", model=str(out), top_k=None, function_to_apply="none")
    inputs = saved(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    for text_scores, row in zip(pipe(TEXTS), logits, strict=True):
        by_label = {s["label"]: s["score"] for s in text_scores}
        got = torch.tensor([by_label[model.config.id2label[i]] for i in range(row.numel())])
        torch.testing.assert_close(got, row, rtol=1e-5, atol=1e-6)


def test_model_in_memory_takes_the_tokenizer_of_its_folder(classifier_dir, tmp_path):
    float_model = load("bert-seqcls", classifier_dir)
    SplitQuantizer.from_pretrained(float_model).quantize(tmp_path, quantization_config=SplitQuantConfig(bits=4))
    assert _tokenizer_files(tmp_path) == {"tokenizer.json", "tokenizer_config.json"}
    assert pipeline("text-classification", model=str(tmp_path))(TEXTS[0])[0]["label"] in ("LABEL_0", "LABEL_1")


def test_causal_lm_keeps_tokenizer_and_generation_config(tokenizer_path, tmp_path):
    source = Path(_with_tokenizer("gpt2-lm", tokenizer_path, tmp_path / "float"))
    GenerationConfig(
        bos_token_id=101, eos_token_id=102, pad_token_id=0, max_new_tokens=3, do_sample=False
    ).save_pretrained(source)
    out = tmp_path / "int4"
    SplitQuantizer.from_pretrained(source).quantize(out, quantization_config=SplitQuantConfig(bits=4))
    assert _tokenizer_files(out) == {"tokenizer.json", "tokenizer_config.json"}
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 3
    generated = pipeline("text-generation", model=str(out))("the quick brown fox", return_full_text=False)
    assert isinstance(generated[0]["generated_text"], str)


def test_no_tokenizer_in_the_source_saves_none(tiny_dirs, tmp_path, caplog):
    # transformers 5 builds an empty tokenizer for a folder without one; none must be saved.
    with caplog.at_level(logging.INFO, logger="optimum_splitquant.hf.optimum"):
        SplitQuantizer.from_pretrained(tiny_dirs["bert-base"]).quantize(
            tmp_path, quantization_config=SplitQuantConfig()
        )
    assert _tokenizer_files(tmp_path) == set()
    assert (tmp_path / "model.safetensors").is_file()
    assert "has no tokenizer or processor" in caplog.text


def test_preprocessing_can_be_left_out(classifier_dir, tmp_path):
    SplitQuantizer.from_pretrained(classifier_dir).quantize(
        tmp_path, quantization_config=SplitQuantConfig(bits=4), with_preprocessing=False
    )
    assert _tokenizer_files(tmp_path) == set()


def test_unloadable_tokenizer_is_a_warning(classifier_dir, tmp_path, caplog):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((Path(classifier_dir) / name).read_bytes())
    (broken / "tokenizer_config.json").write_text("{not json")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="optimum_splitquant.hf.optimum"):
        SplitQuantizer.from_pretrained(broken).quantize(out, quantization_config=SplitQuantConfig(bits=4))
    assert (out / "model.safetensors").is_file() and _tokenizer_files(out) == set()
    assert "could not be loaded" in caplog.text and "holds the model only" in caplog.text
