"""The compiled load-time check gives the verdicts of ``validate()``'s pure-torch path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optimum_splitquant import kernels
from optimum_splitquant.core import QuantSpec
from optimum_splitquant.core.packing import pack_rows, packed_row_bytes, unpack_rows
from optimum_splitquant.nn import SplitQuantLinear
from optimum_splitquant.nn.validation import _ranges_ok, ids_in_range, validate_layers

compiled = pytest.mark.skipif(not kernels.available(), reason="compiled kernels unavailable")

OK, BAD_RANGE, BAD_ID = 0, 1, 2


def check(packed, scale, offset, spec: QuantSpec, dtype=torch.float32) -> int:
    (verdict,) = kernels.check_stored(
        [packed], [scale], [offset], [spec.bits], [spec.symbol_width], [spec.num_clusters], dtype
    )
    return verdict


# Every symbol width from 3 to 12 bits, plus k = 2**id_bits (nothing to check) and k = 1.
ID_CASES = [(2, 3), (2, 5), (3, 3), (3, 6), (4, 3), (5, 3), (6, 5), (4, 12), (7, 3), (8, 3), (8, 6), (8, 11)]
ID_CASES += [(2, 4), (3, 1)]


@pytest.mark.parametrize(("bits", "k"), ID_CASES, ids=str)
def test_id_verdicts_match_a_decode_of_every_symbol(bits, k):
    """The word-wise checks (torch, and compiled where the kernels build) give a full decode's verdict."""
    spec = QuantSpec(bits, k)
    width = spec.symbol_width
    gen = torch.Generator().manual_seed(16 * bits + k)
    scale, offset = torch.ones(3, 1, k, dtype=torch.float16), torch.zeros(3, 1, k, dtype=torch.float16)
    verdicts = []
    for n in (5, 8, 13, 40):
        count = packed_row_bytes(n, width) * 8 // width  # padding included
        for trial in range(24):
            ids = torch.randint(0, k, (3, count), generator=gen)
            if trial % 2:  # one symbol anywhere gets any id pattern
                ids[trial % 3, trial % count] = int(torch.randint(0, 1 << spec.id_bits, (1,), generator=gen))
            codes = torch.randint(0, spec.levels, (3, count), generator=gen)
            packed = pack_rows(ids << bits | codes, width)
            if trial % 6 == 5:
                packed = torch.randint(0, 256, packed.shape, generator=gen, dtype=torch.uint8)
            valid = int((unpack_rows(packed, width, count) >> bits).max()) < k
            assert ids_in_range(packed, spec) == valid, (n, trial)
            unaligned = torch.cat([torch.zeros(3, dtype=torch.uint8), packed.flatten()])[3:].view(packed.shape)
            assert ids_in_range(unaligned, spec) == valid, (n, trial)  # a view 3 bytes into its storage
            if kernels.available():
                assert check(packed, scale, offset, spec) == (OK if valid else BAD_ID), (n, trial)
                assert check(unaligned, scale, offset, spec) == (OK if valid else BAD_ID), (n, trial)
            verdicts.append(valid)
    assert any(verdicts) and (k == 1 << spec.id_bits or not all(verdicts))


def _layer(scale_dtype: torch.dtype, bits: int = 2) -> SplitQuantLinear:
    torch.manual_seed(0)
    return SplitQuantLinear.from_float(nn.Linear(40, 6), QuantSpec(bits, 3, scale_dtype=scale_dtype))


RANGE_EDITS = {
    "intact": lambda s, o: None,
    "nan scale": lambda s, o: s.view(-1)[4].fill_(math.nan),
    "nan offset": lambda s, o: o.view(-1)[7].fill_(math.nan),
    "inf offset": lambda s, o: o.view(-1)[2].fill_(-math.inf),
    "inf scale": lambda s, o: s.view(-1)[0].fill_(math.inf),
    "negative scale": lambda s, o: s.view(-1)[5].fill_(-1e-3),
    "negative zero scale": lambda s, o: s.view(-1)[5].fill_(-0.0),
    "large": lambda s, o: (s.fill_(2e4), o.fill_(-3e4)),  # ends -3e4 .. 3e4: finite in float16
    "over half": lambda s, o: (s.fill_(2.2e4), o.fill_(0.0)),  # top end 6.6e4: overflows float16 only
    "just below half max": lambda s, o: (s.fill_(2e4), o.fill_(5504.0)),  # top end 65504
    # overflows float32 (in float32 storage; narrower storage rounds it to infinity)
    "huge": lambda s, o: (s.copy_(torch.full(s.shape, 3e38)), o.copy_(torch.full(o.shape, 3e38))),
}


@compiled
@pytest.mark.parametrize("edit", list(RANGE_EDITS), ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_range_verdicts_match_the_torch_path(edit, scale_dtype, dtype):
    layer = _layer(scale_dtype)
    with torch.no_grad():
        RANGE_EDITS[edit](layer.weight_scale, layer.weight_offset)
    expected = OK if _ranges_ok(layer.weight_scale, layer.weight_offset, layer.spec, dtype) else BAD_RANGE
    assert check(layer.weight_packed, layer.weight_scale, layer.weight_offset, layer.spec, dtype) == expected
    if edit == "intact":
        assert expected == OK
    if edit.startswith(("nan", "inf", "negative scale")):
        assert expected == BAD_RANGE


@compiled
def test_every_verdict_is_reached():
    """The edits above reach each outcome of the check, in both stored and compute dtypes."""
    layer = _layer(torch.float16)
    args = (layer.weight_packed, layer.weight_scale, layer.weight_offset, layer.spec)
    assert check(*args) == OK
    with torch.no_grad():
        layer.weight_scale.fill_(2.2e4)
        layer.weight_offset.zero_()
    assert check(*args, torch.float32) == OK and check(*args, torch.float16) == BAD_RANGE
    layer = _layer(torch.float16)
    with torch.no_grad():
        layer.weight_packed[2, 1] |= 0xC0  # id 3 with k = 3
    assert check(layer.weight_packed, layer.weight_scale, layer.weight_offset, layer.spec) == BAD_ID


@pytest.mark.parametrize("kernels_on", [pytest.param(True, marks=compiled), False], ids=["compiled", "torch"])
def test_validate_names_the_same_problem_on_both_paths(monkeypatch, kernels_on):
    if not kernels_on:
        monkeypatch.setenv(kernels.ENV_VAR, "off")
    layer = _layer(torch.float16)
    layer.validate(torch.float16)
    with torch.no_grad():
        layer.weight_scale.fill_(2.2e4)
        layer.weight_offset.zero_()
    layer.validate(torch.float32)
    with pytest.raises(ValueError, match=r"overflow torch\.float16"):
        layer.validate(torch.float16)
    layer = _layer(torch.float16)
    with torch.no_grad():
        layer.weight_scale.view(-1)[3] = -1.0
    with pytest.raises(ValueError, match="weight_scale holds negative values"):
        layer.validate()
    layer = _layer(torch.float16)
    with torch.no_grad():
        layer.weight_packed[2, 1] |= 0xC0
    with pytest.raises(ValueError, match="weight_packed holds cluster id 3"):
        layer.validate()


@compiled
def test_refuses_bad_arguments():
    layer = _layer(torch.float16)
    packed, scale, offset = layer.weight_packed, layer.weight_scale, layer.weight_offset
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        kernels.check_stored([packed.to(torch.int16)], [scale], [offset], [2], [4], [3], torch.float32)
    with pytest.raises(RuntimeError, match="one dtype and shape"):
        kernels.check_stored([packed], [scale], [offset.float()], [2], [4], [3], torch.float32)
    with pytest.raises(RuntimeError, match="bad bits/width"):
        kernels.check_stored([packed], [scale], [offset], [5], [4], [3], torch.float32)
    with pytest.raises(RuntimeError, match="one packed, scale, offset"):
        kernels.check_stored([packed, packed], [scale], [offset], [2], [4], [3], torch.float32)


@compiled
def test_one_call_gives_each_layer_its_verdict():
    """Many layers in one call (checked in parallel): each verdict belongs to its own layer."""
    layers = [_layer(torch.float16, bits=2 + i % 3) for i in range(12)]
    with torch.no_grad():
        layers[3].weight_scale.view(-1)[0] = -1.0
        layers[7].weight_packed[0, 0] |= 0xFF  # every width here: an id of all ones, >= 3
        layers[8].weight_offset.view(-1)[1] = math.nan
    expected = [0] * 12
    expected[3], expected[7], expected[8] = BAD_RANGE, BAD_ID, BAD_RANGE
    verdicts = kernels.check_stored(
        [m.weight_packed for m in layers],
        [m.weight_scale for m in layers],
        [m.weight_offset for m in layers],
        [m.spec.bits for m in layers],
        [m.spec.symbol_width for m in layers],
        [m.spec.num_clusters for m in layers],
        torch.float32,
    )
    assert verdicts == expected
    with pytest.raises(ValueError, match=r"^l3: weight_scale holds negative values"):
        validate_layers({f"l{i}": m for i, m in enumerate(layers)})
    validate_layers({f"l{i}": m for i, m in enumerate(layers) if expected[i] == 0})
