"""LoRA on SplitQuant layers through PEFT: injection, training, frozen buffers, adapter files, merging."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest.importorskip("peft")

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import load, quantized_layers
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D

import optimum_splitquant
from optimum_splitquant import SplitQuantConfig, SplitQuantConv2d, SplitQuantLinear
from optimum_splitquant.checkpoint.format import QUANTIZED_TENSORS
from optimum_splitquant.core.spec import QuantSpec
from optimum_splitquant.hf.peft import SplitQuantLoraLinear, load_lora_adapter, merge_lora, register_lora_layers
from tests.helpers import sqnr_db

TARGETS = {"llama-lm": ["q_proj", "v_proj"], "gpt2-lm": ["c_attn"]}


def lora_config(name: str = "llama-lm", **kwargs) -> LoraConfig:
    return register_lora_layers(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], **kwargs))


def quantized(name: str, tiny_dirs) -> nn.Module:
    torch.manual_seed(0)
    return load(name, tiny_dirs[name], quantization_config=SplitQuantConfig(bits=4))


@pytest.fixture
def batch(sample_inputs) -> dict[str, torch.Tensor]:
    ids, mask = sample_inputs["input_ids"], sample_inputs["attention_mask"]
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def packed_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{t}": getattr(layer, t).clone()
        for name, layer in quantized_layers(model).items()
        for t in QUANTIZED_TENSORS
    }


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def trained(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = 3) -> nn.Module:
    """``model`` after a few Adam steps on ``batch`` (LoRA B starts at zero; this makes the adapters matter)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("name", list(TARGETS))
def test_get_peft_model_wraps_the_quantized_targets(name, tiny_dirs):
    model = get_peft_model(quantized(name, tiny_dirs), lora_config(name))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, SplitQuantLoraLinear)}
    assert len(wrapped) == 2 * len(TARGETS[name])  # two decoder layers
    assert all(n.rsplit(".", 1)[-1] in TARGETS[name] for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    layer = next(m for m in model.modules() if isinstance(m, SplitQuantLoraLinear))
    assert isinstance(layer.get_base_layer(), SplitQuantLinear)


def test_without_registration_peft_refuses(tiny_dirs):
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(quantized("llama-lm", tiny_dirs), LoraConfig(r=4, target_modules=["q_proj"]))


def test_fresh_adapter_leaves_outputs_unchanged(tiny_dirs, batch):
    model = quantized("llama-lm", tiny_dirs)
    before = logits(model, batch)
    peft_model = get_peft_model(model, lora_config())
    torch.testing.assert_close(logits(peft_model, batch), before, rtol=0, atol=0)


def test_one_step_lowers_the_loss_and_never_touches_packed_buffers(tiny_dirs, batch):
    model = get_peft_model(quantized("llama-lm", tiny_dirs), lora_config())
    frozen = packed_buffers(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # lora_B starts at zero, so only B gets a gradient on the first step.
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = model(**batch).loss
    assert after < loss.detach()
    now = packed_buffers(model)
    assert now.keys() == frozen.keys()
    for key, value in frozen.items():
        assert torch.equal(now[key], value), key


def test_trainer_accepts_the_model_and_trains(tiny_dirs, batch, tmp_path):
    model = get_peft_model(quantized("llama-lm", tiny_dirs), lora_config())
    frozen = packed_buffers(model)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    with torch.no_grad():
        start = model(**batch).loss.item()
    Trainer(model=model, args=args, train_dataset=rows).train()
    model.eval()
    with torch.no_grad():
        end = model(**batch).loss.item()
    assert end < start
    assert all(torch.equal(packed_buffers(model)[k], v) for k, v in frozen.items())


def test_adapter_round_trip_gives_identical_outputs(tiny_dirs, batch, tmp_path):
    model = trained(get_peft_model(quantized("llama-lm", tiny_dirs), lora_config()), batch)
    expected = logits(model, batch)
    assert not torch.equal(expected, logits(quantized("llama-lm", tiny_dirs), batch)), "training changed nothing"
    model.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    reloaded = load_lora_adapter(quantized("llama-lm", tiny_dirs), tmp_path / "adapter")
    assert isinstance(reloaded, PeftModel)
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)


def test_merge_and_unmerge_keep_outputs_and_restore_the_packed_layer(tiny_dirs, batch):
    model = trained(get_peft_model(quantized("llama-lm", tiny_dirs), lora_config()), batch)
    frozen = packed_buffers(model)
    expected = logits(model, batch)
    model.merge_adapter()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer.get_base_layer()) is nn.Linear
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert isinstance(layer.get_base_layer(), SplitQuantLinear)
    for key, value in packed_buffers(model).items():
        assert torch.equal(value, frozen[key]), key
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(TARGETS))
def test_merge_and_unload_gives_float_layers_with_the_same_outputs(name, tiny_dirs, batch, tmp_path):
    model = trained(get_peft_model(quantized(name, tiny_dirs), lora_config(name)), batch)
    expected = logits(model, batch)
    merged = model.merge_and_unload()
    float_type = Conv1D if name == "gpt2-lm" else nn.Linear
    merged_names = {
        n for n, m in merged.named_modules() if type(m) is float_type and n.rsplit(".", 1)[-1] in TARGETS[name]
    }
    assert len(merged_names) == 2 * len(TARGETS[name])
    assert not any(isinstance(m, SplitQuantLoraLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-5, atol=1e-5)
    # The mixed model (float merged layers, packed others) saves and reloads as a SplitQuant checkpoint.
    merged.save_pretrained(tmp_path / "merged")
    reloaded = load(name, tmp_path / "merged")
    assert {n for n, m in reloaded.named_modules() if type(m) is float_type} >= merged_names
    torch.testing.assert_close(logits(reloaded, batch), logits(merged, batch), rtol=0, atol=0)


def test_merge_lora_requantize_makes_every_layer_packed_again(tiny_dirs, batch):
    base = quantized("llama-lm", tiny_dirs)
    frozen = packed_buffers(base)
    model = trained(get_peft_model(base, lora_config()), batch)
    merged_float = logits(model, batch)
    merged = merge_lora(model, requantize=True)
    layers = quantized_layers(merged)
    q_proj = layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(q_proj, SplitQuantLinear) and q_proj.spec == QuantSpec(bits=4)
    assert not torch.equal(q_proj.weight_packed, frozen["model.layers.0.self_attn.q_proj.weight_packed"])
    assert set(packed_buffers(merged)) == set(frozen)
    # Re-quantizing rounds the merged weight again: close to the adapted model, not equal.
    assert sqnr_db(merged_float, logits(merged, batch)) > 15.0


def test_conv2d_and_rewriting_inits_are_refused_by_name():
    conv = SplitQuantConv2d.from_float(nn.Conv2d(4, 8, 3), QuantSpec(bits=4))
    net = nn.Sequential()
    net.add_module("conv", conv)
    with pytest.raises(TypeError, match=r"SplitQuantConv2d \(conv\) is not supported"):
        get_peft_model(net, register_lora_layers(LoraConfig(r=4, target_modules=["conv"])))
    linear = nn.Sequential()
    linear.add_module("proj", SplitQuantLinear.from_float(nn.Linear(16, 8), QuantSpec(bits=4)))
    with pytest.raises(ValueError, match="rewrites the base weight"):
        get_peft_model(
            linear, register_lora_layers(LoraConfig(r=4, target_modules=["proj"], init_lora_weights="olora"))
        )


def test_register_rejects_other_configs():
    with pytest.raises(TypeError, match="LoraConfig"):
        register_lora_layers(object())


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Modules imported by the statements run at import time (including inside top-level if / try)."""
    names, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names += [module, *(f"{module.rstrip('.')}.{alias.name}" for alias in node.names)]
        elif isinstance(node, (ast.If, ast.Try)):
            todo += [*node.body, *node.orelse, *getattr(node, "finalbody", []), *getattr(node, "handlers", [])]
        elif isinstance(node, ast.ExceptHandler):
            todo += node.body
    return names


def test_no_module_but_hf_peft_imports_peft_at_import_time():
    """So that ``import optimum_splitquant`` works without peft installed."""
    root = Path(optimum_splitquant.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path == root / "hf" / "peft.py":
            continue
        for name in _module_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if name == "peft" or name.startswith("peft.") or name.endswith(".peft"):
                offenders.append(f"{path.relative_to(root)}: {name}")
    assert not offenders
