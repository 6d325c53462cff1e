"""Tiny random transformers models and helpers shared by the transformers-glue tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
)

from optimum_splitquant.nn import SplitQuantModule

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


def _llama(hidden_size: int = 32, intermediate_size: int = 64, num_hidden_layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
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


def load(name: str, path, **kwargs):
    """``from_pretrained`` with the tiny model's Auto class, in eval mode."""
    auto, _ = TINY[name]
    return auto.from_pretrained(path, **kwargs).eval()


def run(model, inputs) -> torch.Tensor:
    """Logits (or last hidden state) of ``model`` on tokenizer ``inputs``, without grad."""
    is_bert = "bert" in type(model).__name__.lower()
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "token_type_ids" or is_bert})
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def quantized_layers(model) -> dict[str, SplitQuantModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SplitQuantModule)}


def rewrite_weights(folder: Path, edit) -> None:
    """Apply ``edit(tensors)`` to ``folder/model.safetensors``, keeping its header metadata."""
    path = Path(folder) / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)
