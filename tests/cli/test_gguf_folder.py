"""``data.gguf_to_folder``: a tiny Llama GGUF written here becomes a plain float32 folder with the loader's weights."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from optimum_splitquant.cli import data  # noqa: E402

HIDDEN, FFN, HEADS, VOCAB = 32, 64, 2, 24  # Q8_0 needs rows of a multiple of 32


def _write_tiny_llama(path) -> None:
    """One Llama block, tied embeddings (no ``output.weight``), F32 and Q8_0 tensors, a byte-level BPE vocabulary."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = ["<s>", "</s>", "<unk>", *"abcdefghijklmnop", "Ġ", "ab", "cd", "Ġa", "Ġb"]
    assert len(tokens) == VOCAB
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 2] + [1] * (VOCAB - 3))
    w.add_token_merges(["a b", "c d", "Ġ a", "Ġ b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)

    def tensor(name: str, *shape: int, q8: bool = False) -> None:
        values = rng.standard_normal(shape).astype(np.float32) * 0.1
        if q8:  # a quantized tensor: the folder must hold its dequantized values
            packed = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, values)

    tensor("token_embd.weight", VOCAB, HIDDEN)
    tensor("output_norm.weight", HIDDEN)
    tensor("blk.0.attn_norm.weight", HIDDEN)
    tensor("blk.0.ffn_norm.weight", HIDDEN)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        tensor(f"blk.0.{name}.weight", HIDDEN, HIDDEN, q8=name == "attn_q")
    tensor("blk.0.ffn_gate.weight", FFN, HIDDEN, q8=True)
    tensor("blk.0.ffn_up.weight", FFN, HIDDEN)
    tensor("blk.0.ffn_down.weight", HIDDEN, FFN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_to_folder_keeps_the_loaders_float_weights_in_a_plain_folder(tmp_path):
    source = tmp_path / "tiny-llama.gguf"
    _write_tiny_llama(source)
    folder = tmp_path / "converted"
    assert data.gguf_to_folder(source, folder) == folder

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert "quantization_config" not in plain.config.to_dict()
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    expected = reference.state_dict()
    got = plain.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], value), key
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # still tied

    ids = torch.tensor([[0, 3, 4, 5, 6, 19]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, reference(input_ids=ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (
        tokenizer("ab cd", add_special_tokens=False).input_ids
        == AutoTokenizer.from_pretrained(tmp_path, gguf_file=source.name)("ab cd", add_special_tokens=False).input_ids
    )
