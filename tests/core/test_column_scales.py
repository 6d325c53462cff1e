"""Column scales (format 4): each input column quantized divided by its own stored scale."""

from __future__ import annotations

import pytest
import torch

from optimum_splitquant.checkpoint.format import COLUMN_SCALE, coded_version, format_version, layer_tensors
from optimum_splitquant.core import QuantSpec, dequantize_weight, quantize_weight
from optimum_splitquant.core.quantize import COLUMN_SCALE_POWER, column_scales
from optimum_splitquant.core.spec import COLUMN_SCALE_MIN_ROWS
from tests.helpers import minilm_linear_weights, sqnr_db

CODED = QuantSpec(4, 1, group_size=32, fit="mse", range_bits=6, range_block=16, column_scales=True)
SPECS = [CODED, QuantSpec(2, 3, column_scales=True), QuantSpec(3, 1, group_size=16, fit="mse", column_scales=True)]


def _rebuilt(q, spec: QuantSpec) -> torch.Tensor:
    return dequantize_weight(q.packed, q.scale, q.offset, q.in_features, spec, column_scale=q.column_scale)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"b{s.bits}k{s.num_clusters}g{s.group_size}r{s.range_bits}")
def test_stored_scales_rebuild_the_quotient_grid(spec: QuantSpec) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.exp(torch.randn(96) * 1.5)  # columns of very different magnitudes
    q = quantize_weight(w, spec)
    c = q.column_scale
    assert c is not None and c.dtype == spec.scale_dtype and tuple(c.shape) == (96,)
    plain = QuantSpec(**{**spec.__dict__, "column_scales": False})
    inner = quantize_weight(w.float() / c.float(), plain)  # the same bytes as quantizing the quotient
    assert torch.equal(q.packed, inner.packed) and torch.equal(q.scale, inner.scale)
    expected = dequantize_weight(inner.packed, inner.scale, inner.offset, 96, plain) * c.float()
    assert torch.equal(_rebuilt(q, spec), expected)


def test_real_minilm_layers_gain_sqnr_and_even_out_column_errors() -> None:
    w = minilm_linear_weights()["encoder.layer.4.attention.self.value.weight"]
    spec = QuantSpec(4, 1, group_size=64, fit="mse", range_bits=6, range_block=16)
    scaled = QuantSpec(**{**spec.__dict__, "column_scales": True})
    plain_w, scaled_w = _rebuilt(quantize_weight(w, spec), spec), _rebuilt(quantize_weight(w, scaled), scaled)
    assert sqnr_db(w, scaled_w) > sqnr_db(w, plain_w) + 0.3  # measured +0.7 dB
    rel = lambda rebuilt: (rebuilt - w).norm(dim=0) / w.norm(dim=0)  # noqa: E731
    assert rel(scaled_w).max() < rel(plain_w).max()  # the worst-served column is served better


def test_scales_are_relative_bounded_and_one_on_zero_columns() -> None:
    w = torch.randn(40, 8)
    w[:, 3] = 0.0
    w[:, 5] *= 1e-9
    w[:, 6] = 7.0  # a constant column has a scale too (its root mean square)
    c = column_scales(w, QuantSpec(4, column_scales=True)).float()
    assert c[3] == 1.0
    assert c[5] == pytest.approx(2.0**-10, rel=1e-3)
    assert torch.isfinite(c).all() and (c > 0).all()
    assert float(c[torch.arange(8) != 3].median()) == 1.0


def test_scales_are_a_power_of_the_relative_magnitude() -> None:
    """Columns 4x and 1/4x the median magnitude get scales 4**±COLUMN_SCALE_POWER, rounded to float16."""
    w = torch.randn(64, 1).sign() * torch.tensor([1.0, 4.0, 0.25, 1.0])
    c = column_scales(w, QuantSpec(4, column_scales=True))
    power = COLUMN_SCALE_POWER
    assert 0 < power < 1 and c.dtype == torch.float16
    assert torch.equal(c, torch.tensor([1.0, 4.0**power, 4.0**-power, 1.0]).half())


def test_short_layers_store_no_column_scales_and_bits_count_them() -> None:
    spec = QuantSpec(4, 1, group_size=32, column_scales=True)
    short = quantize_weight(torch.randn(COLUMN_SCALE_MIN_ROWS - 1, 64), spec)
    assert short.column_scale is None
    assert COLUMN_SCALE not in layer_tensors(COLUMN_SCALE_MIN_ROWS - 1, 64, spec, bias=False)
    assert layer_tensors(COLUMN_SCALE_MIN_ROWS, 64, spec, bias=False)[COLUMN_SCALE].shape == (64,)
    plain = QuantSpec(4, 1, group_size=32)
    assert spec.bits_per_weight(64, 128) == pytest.approx(plain.bits_per_weight(64) + 16 / 128)
    assert spec.bits_per_weight(64, COLUMN_SCALE_MIN_ROWS - 1) == plain.bits_per_weight(64)


def test_column_scales_are_format_4() -> None:
    assert format_version(QuantSpec(4, column_scales=True)) == 4
    assert coded_version(QuantSpec(4, column_scales=True)) == 4
    assert coded_version(QuantSpec(4)) is None
    with pytest.raises(TypeError, match="column_scales must be True or False"):
        QuantSpec(4, column_scales=1)


def test_weights_on_a_row_grid_keep_it_and_store_unit_scales() -> None:
    """A weight converted from a 4-bit file (every group of 32 on its own 16-level grid) loses that grid
    when its columns are rescaled: the layer stores scales of 1 and the bytes of the plain quantizer."""
    torch.manual_seed(2)
    steps = torch.rand(256, 4, 1) * 0.02 + 0.005
    grid = (torch.randint(0, 16, (256, 4, 32)) * steps - 8 * steps).reshape(256, 128)
    q = quantize_weight(grid, CODED)
    assert torch.equal(q.column_scale, torch.ones(128, dtype=torch.float16))
    plain = quantize_weight(grid, QuantSpec(**{**CODED.__dict__, "column_scales": False}))
    assert torch.equal(q.packed, plain.packed) and torch.equal(q.range_codes, plain.range_codes)


def test_a_grid_finer_than_the_codes_keeps_its_column_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    """3-bit codes cannot hold a 16-level grid either way: the layer keeps its scales without a trial (with
    the trial threshold lowered to 3 bits, the trial runs and its verdict decides)."""
    from optimum_splitquant.core import quantize as quantize_module

    torch.manual_seed(2)
    steps = torch.rand(256, 4, 1) * 0.02 + 0.005
    grid = (torch.randint(0, 16, (256, 4, 32)) * steps - 8 * steps).reshape(256, 128)
    spec = QuantSpec(**{**CODED.__dict__, "bits": 3})
    trials = []
    monkeypatch.setattr(quantize_module, "_scales_help", lambda *args: trials.append(1) or False)
    q = quantize_weight(grid, spec)
    assert not trials
    assert torch.equal(q.column_scale, column_scales(grid, spec))
    assert not torch.equal(q.column_scale, torch.ones_like(q.column_scale))
    monkeypatch.setattr(quantize_module, "COLUMN_SCALE_TRIAL_BITS", 3)
    assert torch.equal(quantize_weight(grid, spec).column_scale, torch.ones(128, dtype=torch.float16))
    assert trials == [1]


def test_true_float_minilm_layers_all_take_their_column_scales() -> None:
    for name, w in list(minilm_linear_weights().items())[:6]:
        q = quantize_weight(w, CODED)
        assert not torch.equal(q.column_scale, torch.ones_like(q.column_scale)), name
