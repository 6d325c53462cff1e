"""LoRA on SplitQuant layers through PEFT's own entry points: injection, training, frozen buffers, adapter
files, merging, modules_to_save, the parameter count, the start-up hook; and the earlier helpers."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("peft")

import peft
import peft.tuners.lora.layer
import peft.tuners.lora.model
import peft.utils.other
import torch
from packaging.version import Version
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils.other import ModulesToSaveWrapper
from safetensors import safe_open
from tiny import load, quantized_layers
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D

import optimum_splitquant
from optimum_splitquant import SplitQuantConfig, SplitQuantConv2d, SplitQuantLinear
from optimum_splitquant.checkpoint.format import COMPUTE_TENSORS, PACKED
from optimum_splitquant.core.spec import QuantSpec
from optimum_splitquant.hf.peft import (
    SplitQuantLoraLinear,
    SplitQuantModulesToSave,
    get_lora_model,
    load_lora_adapter,
    merge_lora,
    register_lora_layers,
    register_with_peft,
    weights_in_buffers,
)
from tests.helpers import sqnr_db

TARGETS = {"llama-lm": ["q_proj", "v_proj"], "gpt2-lm": ["c_attn"]}


def lora_config(name: str = "llama-lm", **kwargs) -> LoraConfig:
    """A plain PEFT config: nothing of this package in it."""
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], **kwargs)


def quantized(name: str, tiny_dirs) -> nn.Module:
    torch.manual_seed(0)
    return load(name, tiny_dirs[name], quantization_config=SplitQuantConfig(bits=4))


@pytest.fixture(scope="module")
def quantized_dir(tiny_dirs, tmp_path_factory) -> Path:
    """The tiny Llama quantized and saved (a SplitQuant checkpoint folder)."""
    folder = tmp_path_factory.mktemp("splitquant-llama")
    quantized("llama-lm", tiny_dirs).save_pretrained(folder)
    return folder


@pytest.fixture
def batch(sample_inputs) -> dict[str, torch.Tensor]:
    ids, mask = sample_inputs["input_ids"], sample_inputs["attention_mask"]
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def packed_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packed tensors of every SplitQuant layer, by the layer's name in the model before PEFT wrapped it."""
    return {
        f"{name.replace('.base_layer', '').replace('.original_module', '')}.{t}": getattr(layer, t).clone()
        for name, layer in quantized_layers(model).items()
        for t in COMPUTE_TENSORS
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


def stored_keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as stored:
        return set(stored.keys())


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


def test_register_with_peft_wraps_peft_once(tiny_dirs):
    """The hooks wrap PEFT's own functions, once however often they are installed."""
    register_with_peft()
    register_with_peft()
    hooked = peft.tuners.lora.model.dispatch_default
    assert hooked is not peft.tuners.lora.layer.dispatch_default
    assert hooked._splitquant_original is peft.tuners.lora.layer.dispatch_default
    set_trainable = peft.utils.other._set_trainable
    assert not hasattr(set_trainable._splitquant_original, "_splitquant_original")
    assert peft.peft_model._set_trainable is set_trainable or (
        peft.peft_model._set_trainable._splitquant_original is set_trainable._splitquant_original
    )
    count = peft.PeftModel.get_nb_trainable_parameters
    assert not hasattr(count._splitquant_original, "_splitquant_original")
    # A float model is adapted by PEFT's own layers, as without the hooks.
    model = get_peft_model(load("llama-lm", tiny_dirs["llama-lm"]), lora_config())
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer) is peft.tuners.lora.layer.Linear


def test_a_custom_module_registered_on_the_config_wins(tiny_dirs):
    class Custom(SplitQuantLoraLinear):
        pass

    config = lora_config()
    config._register_custom_module({SplitQuantLinear: Custom})
    model = get_peft_model(quantized("llama-lm", tiny_dirs), config)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj) is Custom


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
    now = packed_buffers(model)
    assert now.keys() == frozen.keys() and all(torch.equal(now[k], v) for k, v in frozen.items())


def test_adapter_round_trip_gives_identical_outputs(tiny_dirs, batch, tmp_path):
    model = trained(get_peft_model(quantized("llama-lm", tiny_dirs), lora_config()), batch)
    expected = logits(model, batch)
    assert not torch.equal(expected, logits(quantized("llama-lm", tiny_dirs), batch)), "training changed nothing"
    model.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    reloaded = PeftModel.from_pretrained(quantized("llama-lm", tiny_dirs), tmp_path / "adapter")
    assert sum(isinstance(m, SplitQuantLoraLinear) for m in reloaded.modules()) == 4
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
    spec = base.model.layers[0].self_attn.q_proj.spec
    model = trained(get_peft_model(base, lora_config()), batch)
    merged_float = logits(model, batch)
    merged = merge_lora(model, requantize=True)
    layers = quantized_layers(merged)
    q_proj = layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(q_proj, SplitQuantLinear) and q_proj.spec == spec
    assert not torch.equal(q_proj.weight_packed, frozen["model.layers.0.self_attn.q_proj.weight_packed"])
    assert set(packed_buffers(merged)) == set(frozen)
    # Re-quantizing rounds the merged weight again: close to the adapted model, not equal.
    assert sqnr_db(merged_float, logits(merged, batch)) > 15.0


def test_conv2d_and_rewriting_inits_are_refused_by_name():
    conv = SplitQuantConv2d.from_float(nn.Conv2d(4, 8, 3), QuantSpec(bits=4))
    net = nn.Sequential()
    net.add_module("conv", conv)
    with pytest.raises(TypeError, match=r"SplitQuantConv2d \(conv\) is not supported"):
        get_peft_model(net, LoraConfig(r=4, target_modules=["conv"]))
    linear = nn.Sequential()
    linear.add_module("proj", SplitQuantLinear.from_float(nn.Linear(16, 8), QuantSpec(bits=4)))
    with pytest.raises(ValueError, match="rewrites the base weight"):
        get_peft_model(linear, LoraConfig(r=4, target_modules=["proj"], init_lora_weights="olora"))


def test_print_trainable_parameters_counts_the_packed_weights(tiny_dirs, capsys):
    """The packed weights are buffers; PEFT's count includes them as the weights of the float layers."""
    quantized_model = get_peft_model(quantized("llama-lm", tiny_dirs), save_config())
    float_model = get_peft_model(load("llama-lm", tiny_dirs["llama-lm"]), save_config())
    counts = quantized_model.get_nb_trainable_parameters()
    assert counts == float_model.get_nb_trainable_parameters()
    layers = quantized_layers(quantized_model)
    assert weights_in_buffers(quantized_model) == sum(m.in_features * m.out_features for m in layers.values())
    quantized_model.print_trainable_parameters()
    assert f"all params: {counts[1]:,d}" in capsys.readouterr().out


# modules_to_save on SplitQuant layers ---------------------------------------------------------


def float_copies(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of every ``modules_to_save`` copy, by the name an adapter file stores them under."""
    return {
        f"{name}.{param_name}": param.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, ModulesToSaveWrapper)
        for param_name, param in module.modules_to_save["default"].named_parameters()
    }


def save_config(**kwargs) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["o_proj"], **kwargs)


@pytest.mark.parametrize("saved", ["o_proj", "mlp"])
def test_modules_to_save_trains_float_copies_of_splitquant_layers(saved, tiny_dirs, batch):
    base = quantized("llama-lm", tiny_dirs)
    expected = logits(base, batch)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=[saved]))
    frozen = packed_buffers(model)
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, SplitQuantModulesToSave)}
    assert len(wrappers) == 2 and all(n.endswith(saved) for n in wrappers)
    for wrapper in wrappers.values():
        originals = quantized_layers(wrapper.original_module)
        copies = dict(wrapper.modules_to_save["default"].named_modules())
        assert originals and not quantized_layers(wrapper.modules_to_save["default"])
        for inner, layer in originals.items():
            assert type(copies[inner]) is nn.Linear
            assert torch.equal(copies[inner].weight, layer.dequantize_weight())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {
        n for n, _ in model.named_parameters() if f"{saved}.modules_to_save.default." in n
    }
    # The float copies compute what the packed layers did.
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    before = float_copies(model)
    trained(model, batch, steps=1)
    after = float_copies(model)
    assert after.keys() == before.keys() and len(before) == 2 * len(originals)
    assert all(not torch.equal(after[n], w) for n, w in before.items())
    now = packed_buffers(model)
    assert now.keys() == frozen.keys() and all(torch.equal(now[k], v) for k, v in frozen.items())
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)


def test_modules_to_save_adapter_saves_small_and_loads_onto_a_fresh_base(tiny_dirs, batch, tmp_path):
    """Plain PEFT all the way: get_peft_model, train, save_pretrained, PeftModel.from_pretrained."""
    model = trained(get_peft_model(quantized("llama-lm", tiny_dirs), save_config()), batch)
    expected = logits(model, batch)
    copies = float_copies(model)
    assert len(copies) == 2
    model.save_pretrained(tmp_path / "adapter")
    keys = stored_keys(tmp_path / "adapter")
    # The LoRA weights and the float copies of the named modules; nothing packed, nothing else.
    lora = {k for k in keys if ".lora_A." in k or ".lora_B." in k}
    assert len(lora) == 2 * 2 * len(TARGETS["llama-lm"])
    assert keys - lora == set(copies) and not any(PACKED in k for k in keys)
    reloaded = PeftModel.from_pretrained(quantized("llama-lm", tiny_dirs), tmp_path / "adapter")
    assert not any(p.requires_grad for p in reloaded.parameters())
    assert sum(isinstance(m, SplitQuantModulesToSave) for m in reloaded.modules()) == 2
    loaded = float_copies(reloaded)
    assert loaded.keys() == copies.keys() and all(torch.equal(loaded[n], w) for n, w in copies.items())
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)
    trainable = PeftModel.from_pretrained(quantized("llama-lm", tiny_dirs), tmp_path / "adapter", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad and "lora_" not in n} == {
        n for n, _ in trainable.named_parameters() if "o_proj.modules_to_save.default." in n
    }


def test_transformers_load_adapter_gives_identical_outputs(tiny_dirs, batch, tmp_path):
    model = trained(get_peft_model(quantized("llama-lm", tiny_dirs), save_config()), batch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    base = quantized("llama-lm", tiny_dirs)
    base.load_adapter(str(tmp_path / "adapter"))
    attention = base.model.layers[0].self_attn
    assert isinstance(attention.q_proj, SplitQuantLoraLinear)
    assert isinstance(attention.o_proj, SplitQuantModulesToSave)
    torch.testing.assert_close(logits(base, batch), expected, rtol=0, atol=0)


def test_transformers_add_adapter_trains_lora_and_float_copies(tiny_dirs, batch, monkeypatch):
    if Version(peft.__version__) < Version("0.22"):
        # transformers 5.25 asks for peft>=0.22 in add_adapter, then calls peft's inject_adapter_in_model.
        monkeypatch.setattr("transformers.integrations.peft.check_peft_version", lambda min_version: None)
    model = quantized("llama-lm", tiny_dirs)
    frozen = packed_buffers(model)
    model.add_adapter(save_config())
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, SplitQuantLoraLinear)
    assert isinstance(attention.o_proj, SplitQuantModulesToSave)
    model.train()
    model(**batch).loss.backward()
    grads = {n.split(".")[-3] for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"lora_A", "lora_B", "modules_to_save"}
    now = packed_buffers(model)
    assert now.keys() == frozen.keys() and all(torch.equal(now[k], v) for k, v in frozen.items())


def test_auto_peft_model_loads_the_quantized_base_named_in_the_adapter(quantized_dir, batch, tmp_path):
    torch.manual_seed(0)
    base = load("llama-lm", quantized_dir)
    model = trained(get_peft_model(base, save_config()), batch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == quantized_dir
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    assert sum(isinstance(m, SplitQuantLoraLinear) for m in reloaded.modules()) == 4
    assert quantized_layers(reloaded)
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)


def test_modules_to_save_trained_on_the_float_model_loads_onto_the_quantized_one(tiny_dirs, batch, tmp_path):
    torch.manual_seed(0)
    float_model = trained(get_peft_model(load("llama-lm", tiny_dirs["llama-lm"]), save_config()), batch)
    float_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(quantized("llama-lm", tiny_dirs), tmp_path / "adapter")
    copies, loaded = float_copies(float_model), float_copies(reloaded)
    assert len(copies) == 2 and loaded.keys() == copies.keys()
    assert all(torch.equal(loaded[n], w) for n, w in copies.items())


def test_modules_to_save_copies_take_the_model_dtype(tiny_dirs, batch):
    base = load("llama-lm", tiny_dirs["llama-lm"], quantization_config=SplitQuantConfig(bits=4), dtype=torch.bfloat16)
    model = get_peft_model(base, save_config())
    assert {w.dtype for w in float_copies(model).values()} == {torch.bfloat16}
    assert torch.isfinite(model(**batch).loss)


def test_second_adapter_gets_its_own_float_copy(tiny_dirs):
    model = get_peft_model(quantized("llama-lm", tiny_dirs), save_config())
    model.add_adapter("other", save_config())
    wrapper = model.get_base_model().model.layers[0].self_attn.o_proj
    assert isinstance(wrapper, SplitQuantModulesToSave)
    assert {type(m) for m in wrapper.modules_to_save.values()} == {nn.Linear}
    assert wrapper.modules_to_save["other"] is not wrapper.modules_to_save["default"]


def test_merge_lora_requantize_quantizes_the_trained_copies_again(tiny_dirs, batch):
    base = quantized("llama-lm", tiny_dirs)
    frozen = packed_buffers(base)
    spec = base.model.layers[0].self_attn.o_proj.spec
    model = trained(get_peft_model(base, save_config()), batch)
    float_merged = merge_lora(copy.deepcopy(model))
    assert type(float_merged.model.layers[0].self_attn.o_proj) is nn.Linear
    merged = merge_lora(model, requantize=True)
    o_proj = merged.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, SplitQuantLinear) and o_proj.spec == spec
    assert not torch.equal(o_proj.weight_packed, frozen["model.layers.0.self_attn.o_proj.weight_packed"])
    assert set(packed_buffers(merged)) == set(frozen)


@pytest.mark.parametrize("named", [False, True], ids=["added-by-peft", "named"])
def test_a_splitquant_task_head_trains_a_float_copy(named, tiny_dirs):
    """PEFT adds the head of a SEQ_CLS model to modules_to_save by itself; a quantized head trains in float."""
    base = load(
        "bert-seqcls", tiny_dirs["bert-seqcls"], quantization_config=SplitQuantConfig(modules_to_not_convert=[])
    )
    assert isinstance(base.classifier, SplitQuantLinear)
    extra = {"modules_to_save": ["classifier"]} if named else {}
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query"], task_type=TaskType.SEQ_CLS, **extra))
    head = model.get_base_model().classifier
    assert isinstance(head, SplitQuantModulesToSave)
    assert type(head.modules_to_save["default"]) is nn.Linear
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())


def test_a_second_adapters_float_copy_trains_as_peft_decides(tiny_dirs):
    """A module only the added (inactive) adapter saves: frozen until that adapter is set, as for a float model."""
    trainable = {}
    for kind, base in [("int4", quantized("llama-lm", tiny_dirs)), ("float", load("llama-lm", tiny_dirs["llama-lm"]))]:
        model = get_peft_model(base, lora_config())
        model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"]))
        before = {n for n, p in model.named_parameters() if p.requires_grad}
        model.set_adapter("other")
        trainable[kind] = before, {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable["int4"] == trainable["float"]
    assert any("modules_to_save.other" in n for n in trainable["int4"][1])


def test_plain_peft_works_in_a_process_that_never_imports_the_package(quantized_dir, tmp_path):
    """The start-up hook imports optimum_splitquant.hf.peft once peft and the package are both imported."""
    script = f"""
        import sys
        import peft
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        assert "optimum_splitquant" not in sys.modules
        model = AutoModelForCausalLM.from_pretrained({str(quantized_dir)!r})
        assert "optimum_splitquant.hf.peft" in sys.modules
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["o_proj"])
        model = get_peft_model(model, config)
        attention = model.get_base_model().model.layers[0].self_attn
        print(type(attention.q_proj).__name__, type(attention.o_proj).__name__, *model.get_nb_trainable_parameters())
        """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("OPTIMUM_SPLITQUANT_NO_AUTOLOAD", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    in_process = get_peft_model(load("llama-lm", quantized_dir), save_config()).get_nb_trainable_parameters()
    assert proc.stdout.split() == ["SplitQuantLoraLinear", "SplitQuantModulesToSave", *map(str, in_process)]


# The helpers of earlier versions ---------------------------------------------------------------


def test_register_lora_layers_is_deprecated_and_still_works(tiny_dirs):
    with pytest.warns(DeprecationWarning, match="register_lora_layers is no longer needed"):
        config = register_lora_layers(lora_config())
    model = get_peft_model(quantized("llama-lm", tiny_dirs), config)
    assert sum(isinstance(m, SplitQuantLoraLinear) for m in model.modules()) == 4
    with pytest.raises(TypeError, match="LoraConfig"):
        register_lora_layers(object())


def test_get_lora_model_is_deprecated_and_still_works(tiny_dirs):
    with pytest.warns(DeprecationWarning, match="use peft.get_peft_model"):
        model = get_lora_model(quantized("llama-lm", tiny_dirs), save_config())
    assert sum(isinstance(m, SplitQuantLoraLinear) for m in model.modules()) == 4
    assert sum(isinstance(m, SplitQuantModulesToSave) for m in model.modules()) == 2


def test_load_lora_adapter_loads_as_peft_does(tiny_dirs, batch, tmp_path):
    model = trained(get_peft_model(quantized("llama-lm", tiny_dirs), save_config()), batch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_lora_adapter(quantized("llama-lm", tiny_dirs), tmp_path / "adapter")
    assert isinstance(reloaded, PeftModel)
    assert sum(isinstance(m, SplitQuantModulesToSave) for m in reloaded.modules()) == 2
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)


def test_load_lora_adapter_refuses_a_pickled_adapter(tiny_dirs, batch, tmp_path, monkeypatch):
    model = get_peft_model(quantized("llama-lm", tiny_dirs), save_config())
    model.save_pretrained(tmp_path / "adapter", safe_serialization=False)  # adapter_model.bin, a pickle
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a) or {})
    with pytest.raises(ValueError, match=r"adapter_model\.bin, a pickle; optimum-splitquant loads safetensors only"):
        load_lora_adapter(quantized("llama-lm", tiny_dirs), tmp_path / "adapter")
    assert unpickled == []


def test_adapter_with_packed_copies_loads_as_saved(tiny_dirs, batch, tmp_path, caplog, monkeypatch):
    """Earlier versions copied modules_to_save SplitQuant layers packed; load_lora_adapter loads such files as saved."""
    # PEFT without the modules_to_save hook makes such packed copies.
    monkeypatch.setattr(peft.utils.other, "_set_trainable", peft.utils.other._set_trainable._splitquant_original)
    model = get_peft_model(quantized("llama-lm", tiny_dirs), save_config())
    monkeypatch.undo()
    assert not any(isinstance(m, SplitQuantModulesToSave) for m in model.modules())
    trained(model, batch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    with caplog.at_level("WARNING", logger="optimum_splitquant.hf.peft"):
        reloaded = load_lora_adapter(quantized("llama-lm", tiny_dirs), tmp_path / "adapter")
    assert "model.layers.0.self_attn.o_proj" in caplog.text and "packed" in caplog.text
    assert not any(isinstance(m, SplitQuantModulesToSave) for m in reloaded.modules())
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)


def test_failed_modules_to_save_puts_the_wrapped_modules_back(tiny_dirs):
    base = quantized("llama-lm", tiny_dirs)
    o_proj = base.model.layers[0].self_attn.o_proj
    # 'default' also matches the LoRA layers' own 'lora_A.default': PEFT refuses it after o_proj was wrapped.
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj", "default"])
    with pytest.raises(ValueError, match="does not conflict with any of the targeted modules"):
        get_peft_model(base, config)
    assert base.model.layers[0].self_attn.o_proj is o_proj


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
    """Only the ``hf/peft`` subpackage imports peft, so that ``import optimum_splitquant`` works without peft installed."""
    root = Path(optimum_splitquant.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if root / "hf" / "peft" in path.parents:  # the PEFT glue: imported only with peft installed
            continue
        for name in _module_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if name == "peft" or name.startswith("peft.") or name.endswith(".peft"):
                offenders.append(f"{path.relative_to(root)}: {name}")
    assert not offenders
