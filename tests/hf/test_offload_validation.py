"""Layers that accelerate offloads (to disk, or to CPU beside an accelerator) are validated at load too.

The damaged layer is placed off the model by the ``device_map``; the load must refuse it with the very
error a plain load gives, and an intact checkpoint must load with the plain load's logits. Without a GPU,
CPU offload is the layout a machine with an accelerator gets: ``torch.device("cpu")`` plays the accelerator
(accelerate's main device) and the modules mapped to ``"cpu"`` are offloaded to a CPU state dict.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from tiny import load, rewrite_weights, run

from optimum_splitquant import SplitQuantConfig
from optimum_splitquant.checkpoint.format import OFFSET, PACKED, RANGE_STEPS, SCALE, stored_tensors
from optimum_splitquant.hf.loaded import onloaded
from optimum_splitquant.nn import SplitQuantLinear

NAME = "llama-lm"
LAYER = "model.layers.0.self_attn.q_proj"

FORMATS = {
    "format1": SplitQuantConfig(bits=2),
    # Coded ranges with three clusters: 2-bit codes and 2-bit cluster ids, as in format 1.
    "format2": SplitQuantConfig(bits=2, num_clusters=3, group_size=32, fit="mse", range_bits=6),
}

_MAIN = torch.device("cpu")  # accelerate's main device: not the string "cpu", so "cpu" modules are offloaded
_REST = ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")
PLACEMENTS = {
    # name: (device_map, offload_buffers, whether the damaged layer's stored tensors leave the model)
    "disk": ({**dict.fromkeys(_REST, "cpu"), "model.layers.0": "disk", "model.layers.1": "cpu"}, False, False),
    "disk-buffers-too": (
        {**dict.fromkeys(_REST, "cpu"), "model.layers.0": "disk", "model.layers.1": "cpu"},
        True,
        True,
    ),
    # A CPU-only machine runs "cpu" modules in place (hooked, not offloaded) beside the disk ones.
    "cpu-beside-disk": (
        {**dict.fromkeys(_REST, "cpu"), "model.layers.0": "cpu", "model.layers.1": "disk"},
        True,
        False,
    ),
    "cpu-offload": ({**dict.fromkeys(_REST, _MAIN), "model.layers.0": "cpu", "model.layers.1": _MAIN}, False, False),
    "cpu-offload-buffers-too": (
        {**dict.fromkeys(_REST, _MAIN), "model.layers.0": "cpu", "model.layers.1": _MAIN},
        True,
        True,
    ),
}


def _set_first(suffix: str, value: float):
    def edit(tensors):
        tensors[f"{LAYER}.{suffix}"].view(-1)[0] = value

    return edit


def _cluster_id_3(tensors):
    tensors[f"{LAYER}.{PACKED}"][3, 5] = 0xF3  # width 4: the high nibble is a symbol with cluster id 3, k = 3


DAMAGES = {
    "format1-nan-scale": ("format1", _set_first(SCALE, float("nan"))),
    "format1-cluster-id": ("format1", _cluster_id_3),
    "format2-nan-step": ("format2", _set_first(RANGE_STEPS, float("nan"))),
    "format2-negative-step": ("format2", _set_first(RANGE_STEPS, -1.0)),
    "format2-cluster-id": ("format2", _cluster_id_3),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_dirs):
    """One intact checkpoint of the tiny Llama per format (read-only)."""
    out = {}
    for fmt, config in FORMATS.items():
        path = tmp_path_factory.mktemp(f"q-{fmt}")
        load(NAME, tiny_dirs[NAME], quantization_config=config).save_pretrained(path)
        out[fmt] = path
    return out


@pytest.fixture(scope="module")
def damaged(saved, tmp_path_factory):
    """Each damaged checkpoint with the error a plain load gives for it (read-only)."""
    out = {}
    for damage, (fmt, edit) in DAMAGES.items():
        path = tmp_path_factory.mktemp(f"damaged-{damage}") / "ckpt"
        shutil.copytree(saved[fmt], path)
        rewrite_weights(path, edit)
        with pytest.raises(ValueError) as plain:
            load(NAME, path)
        out[damage] = path, str(plain.value)
    return out


def _load_placed(path, placement, tmp_path):
    device_map, offload_buffers, _ = PLACEMENTS[placement]
    return load(
        NAME, path, device_map=device_map, offload_folder=str(tmp_path / "offload"), offload_buffers=offload_buffers
    )


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_offloaded_layer_is_refused_as_a_plain_load_refuses_it(damaged, damage, placement, tmp_path):
    path, plain_error = damaged[damage]
    assert plain_error.startswith(f"{LAYER}: ")
    with pytest.raises(ValueError) as offloaded:
        _load_placed(path, placement, tmp_path)
    assert str(offloaded.value) == plain_error


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_an_intact_offloaded_checkpoint_loads_with_the_plain_logits(saved, sample_inputs, fmt, placement, tmp_path):
    expected = run(load(NAME, saved[fmt]), sample_inputs)
    model = _load_placed(saved[fmt], placement, tmp_path)
    layer = model.get_submodule(LAYER)
    assert hasattr(layer, "_hf_hook")
    if PLACEMENTS[placement][2]:  # validating left the offloaded layer as light as the offload made it
        assert all(getattr(layer, buf).is_meta for buf in stored_tensors(layer.spec))
        if layer.coded:
            assert SCALE not in layer._buffers and OFFSET not in layer._buffers
    assert torch.equal(run(model, sample_inputs), expected)


class _Hook:
    """The parts of accelerate's ``AlignDevicesHook`` that validation reads."""

    def __init__(self, weights_map: dict[str, torch.Tensor]) -> None:
        self.offload, self.weights_map = True, weights_map


def test_an_offloaded_layer_missing_from_the_offloaded_weights_is_named():
    layer = SplitQuantLinear(8, 2, False, spec=FORMATS["format1"].to_spec(), device="meta")
    layer._hf_hook = SimpleNamespace(hooks=[_Hook({PACKED: torch.zeros(2, 4, dtype=torch.uint8)})])
    before = dict(layer._buffers)
    missing = rf"^{LAYER}\.{SCALE} was not loaded \(on the meta device, and not among the offloaded weights\)$"
    with pytest.raises(ValueError, match=missing), onloaded(LAYER, layer):
        pass
    assert layer._buffers.keys() == before.keys()
    assert all(layer._buffers[name] is tensor for name, tensor in before.items())


def test_onloading_puts_the_layer_back_as_it_was():
    spec = FORMATS["format2"].to_spec()
    source = SplitQuantLinear(32, 4, False, spec=spec)
    layer = SplitQuantLinear(32, 4, False, spec=spec, device="meta")
    layer._hf_hook = _Hook({name: getattr(source, name) for name in stored_tensors(spec)})
    with onloaded(LAYER, layer):
        assert not layer.weight_packed.is_meta
        assert all(torch.equal(a, b) for a, b in zip(layer.ranges(), source.ranges(), strict=True))
    assert set(layer._buffers) == set(stored_tensors(spec))
    assert all(buf.is_meta for buf in layer._buffers.values())
