"""The stored format's declaration agrees with what the modules allocate and the loader checks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from optimum_splitquant.checkpoint import read_checkpoint_index
from optimum_splitquant.checkpoint.format import COMPUTE_TENSORS, SCALE_FILE_DTYPES, layer_tensors
from optimum_splitquant.core import QuantSpec
from optimum_splitquant.nn import SplitQuantConv2d, SplitQuantLinear

_FILE_DTYPE = {torch.uint8: "U8", **{dtype: name for name, dtype in SCALE_FILE_DTYPES.items()}}

SPECS = [QuantSpec(2, 3), QuantSpec(3, 4, group_size=8), QuantSpec(4, 1), QuantSpec(8, 16, scale_dtype=torch.float32)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"b{s.bits}k{s.num_clusters}g{s.group_size}")
@pytest.mark.parametrize("bias", [True, False])
def test_modules_store_exactly_the_declared_tensors(spec, bias):
    for layer, (rows, width) in (
        (SplitQuantLinear(40, 6, bias, spec=spec), (6, 40)),
        (SplitQuantConv2d(4, 6, 2, bias=bias, spec=spec), (6, 16)),
    ):
        declared = layer_tensors(rows, width, spec, bias=bias)
        stored = layer.state_dict()
        assert set(stored) == set(declared)
        assert set(COMPUTE_TENSORS) <= set(stored)
        for name, tensor in stored.items():
            assert tuple(tensor.shape) == declared[name].shape, name
            assert _FILE_DTYPE[tensor.dtype] in declared[name].file_dtypes, name


def test_group_size_must_divide_the_width():
    with pytest.raises(ValueError, match="group_size=16 does not divide the input width 40"):
        layer_tensors(6, 40, QuantSpec(2, group_size=16), bias=False)


def test_index_checks_a_layer_against_the_declaration(tmp_path):
    spec = QuantSpec(2, 3)
    layer = SplitQuantLinear(40, 6, True, spec=spec)
    tensors = {f"fc.{k}": v for k, v in layer.state_dict().items()}
    expected = layer_tensors(6, 40, spec, bias=True)
    save_file(tensors, str(tmp_path / "a.safetensors"))
    index = read_checkpoint_index([tmp_path / "a.safetensors"])
    assert index.quantized_modules() == {"fc"}
    index.check_layer("fc", expected, "Linear(40 -> 6)", "bits=2")  # complete and well-shaped: no error

    scale = tensors["fc.weight_scale"]
    tensors["fc.weight_scale"] = scale[:, :, :2].contiguous()
    save_file(tensors, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"'fc.weight_scale' in b.safetensors has shape \[6, 1, 2\]"):
        read_checkpoint_index([tmp_path / "b.safetensors"]).check_layer("fc", expected, "Linear(40 -> 6)", "bits=2")
    tensors["fc.weight_scale"] = scale
    del tensors["fc.bias"]
    save_file(tensors, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor 'fc\.bias'"):
        read_checkpoint_index([tmp_path / "c.safetensors"]).check_layer("fc", expected, "Linear(40 -> 6)", "bits=2")
