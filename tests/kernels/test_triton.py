"""The Triton kernels: exact dequantization, the fused linear, the custom ops and the switch.

Without a CUDA device the kernels run in triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is first imported) on CPU tensors; with one they run compiled on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import torch.nn.functional as F
from torch import nn

from optimum_splitquant import kernels
from optimum_splitquant.core import QuantSpec, dequantize_weight, quantize_weight
from optimum_splitquant.kernels import triton_ops
from optimum_splitquant.nn import SplitQuantLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (bits, clusters) -> symbol widths 2..10, and 12 (three bytes per symbol at most)
WIDTH_CASES = [(b, k) for b in (2, 3, 4, 8) for k in (1, 2, 3, 4)] + [(5, 1), (6, 1), (7, 1), (8, 16)]
WIDTH_IDS = [f"b{b}k{k}-w{QuantSpec(b, k).symbol_width}" for b, k in WIDTH_CASES]
# (in_features, group_size): odd widths, not multiples of 8, per-row and grouped ranges
SHAPES = [(37, None), (45, 15), (64, 16)]
SHAPE_IDS = ["in37-row", "in45-g15", "in64-g16"]


def quantized(bits: int, k: int, in_f: int, group_size: int | None, scale_dtype=torch.float16, rows: int = 19):
    spec = QuantSpec(bits, k, group_size=group_size, scale_dtype=scale_dtype)
    gen = torch.Generator().manual_seed(bits * 100 + k * 10 + in_f)
    w = torch.randn(rows, in_f, generator=gen)
    w[0, :3] = torch.tensor([2.5, -3.0, 1.7])  # outliers, so the clusters differ
    q = quantize_weight(w, spec)
    ref = dequantize_weight(q.packed, q.scale, q.offset, in_f, spec)
    return spec, q.packed.to(DEVICE), q.scale.to(DEVICE), q.offset.to(DEVICE), ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("in_f", "group_size"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(("bits", "k"), WIDTH_CASES, ids=WIDTH_IDS)
def test_triton_dequantize_matches_reference_exactly(bits: int, k: int, in_f: int, group_size: int | None) -> None:
    spec, packed, scale, offset, ref = quantized(bits, k, in_f, group_size)
    out = triton_ops.dequantize(packed, scale, offset, in_f, bits, spec.symbol_width)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_triton_dequantize_output_and_scale_dtypes(dtype: torch.dtype, scale_dtype: torch.dtype) -> None:
    spec, packed, scale, offset, _ = quantized(2, 3, 45, 15, scale_dtype)
    ref = dequantize_weight(packed.cpu(), scale.cpu(), offset.cpu(), 45, spec, dtype)
    out = triton_ops.dequantize(packed, scale, offset, 45, 2, spec.symbol_width, dtype)
    assert out.dtype == dtype
    assert torch.equal(out.cpu(), ref)


def test_triton_dequantize_empty_rows() -> None:
    spec, packed, scale, offset, _ = quantized(4, 2, 37, None)
    out = triton_ops.dequantize(packed[:0], scale[:0], offset[:0], 37, 4, spec.symbol_width)
    assert out.shape == (0, 37)


# the symbol widths of the defaults and of SplitQuantConfig.for_budget (3, 4, 5), and 6, 8, 10
LINEAR_CASES = [(2, 2, 64), (2, 3, None), (2, 4, None), (3, 2, 64), (4, 2, 64), (4, 4, None), (8, 1, None), (8, 4, 64)]


LINEAR_IDS = [f"b{b}k{k}-w{QuantSpec(b, k).symbol_width}-{f'g{g}' if g else 'row'}" for b, k, g in LINEAR_CASES]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("tokens", [1, 5], ids=["1tok", "5tok"])
@pytest.mark.parametrize(("bits", "k", "group_size"), LINEAR_CASES, ids=LINEAR_IDS)
def test_triton_linear_matches_dense(bits: int, k: int, group_size: int | None, tokens: int, with_bias: bool) -> None:
    in_f = 192 if group_size else 203  # 203: not a multiple of 8, nor of the column block
    spec, packed, scale, offset, ref = quantized(bits, k, in_f, group_size, rows=37)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, in_f, generator=gen)
    bias = torch.randn(37, generator=gen) if with_bias else None
    want = x.double() @ ref.double().T + (bias.double() if with_bias else 0)
    dev_bias = bias.to(DEVICE) if with_bias else None
    y = triton_ops.linear(x.to(DEVICE), packed, scale, offset, dev_bias, in_f, bits, spec.symbol_width)
    assert y.shape == (tokens, 37) and y.dtype == torch.float32
    assert rel_err(y.cpu(), want) < 1e-6  # fp32 sums in another order

    xb = x.to(DEVICE, torch.bfloat16)
    yb = triton_ops.linear(xb, packed, scale, offset, None, in_f, bits, spec.symbol_width)
    assert yb.dtype == torch.bfloat16
    want_b = xb.cpu().double() @ ref.double().T
    assert rel_err(yb.cpu(), want_b) < 8e-3  # the bf16 rounding of the output (2**-8 relative)


def test_triton_linear_rejects_too_many_tokens() -> None:
    spec, packed, scale, offset, _ = quantized(2, 3, 37, None)
    x = torch.randn(triton_ops.MAX_TOKENS + 1, 37, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        triton_ops.linear(x, packed, scale, offset, None, 37, 2, spec.symbol_width)


@pytest.mark.parametrize("shape", [(2, 5, 45), (1, 45), (3, 4, 45)], ids=["decode-batch", "one-token", "prefill"])
def test_triton_forward_selects_fused_or_gemm(shape: tuple[int, ...]) -> None:
    spec, packed, scale, offset, ref = quantized(2, 3, 45, 15)
    x = torch.randn(*shape, device=DEVICE)
    bias = torch.randn(19, device=DEVICE)
    y = triton_ops.forward(x, packed, scale, offset, bias, 45, 2, spec.symbol_width)
    want = F.linear(x.cpu(), ref, bias.cpu())
    assert y.shape == (*shape[:-1], 19)
    assert rel_err(y.cpu(), want) < 1e-6


def test_triton_forward_passes_gradients_to_x() -> None:
    spec, packed, scale, offset, ref = quantized(2, 3, 45, 15)
    x = torch.randn(2, 45, device=DEVICE, requires_grad=True)
    triton_ops.forward(x, packed, scale, offset, None, 45, 2, spec.symbol_width).sum().backward()
    assert torch.allclose(x.grad.cpu(), ref.sum(0).expand(2, -1), rtol=1e-5, atol=1e-6)


def test_triton_ops_fake_implementations() -> None:
    spec, packed, scale, offset, _ = quantized(3, 2, 64, 16)
    x = torch.randn(4, 64, device=DEVICE)
    args_dq = (packed, scale, offset, 64, 3, spec.symbol_width, torch.bfloat16)
    torch.library.opcheck(torch.ops.optimum_splitquant_triton.dequantize.default, args_dq, test_utils="test_faketensor")
    args_lin = (x, packed, scale, offset, None, 64, 3, spec.symbol_width)
    torch.library.opcheck(torch.ops.optimum_splitquant_triton.linear.default, args_lin, test_utils="test_faketensor")


@pytest.mark.parametrize(("value", "expected"), [("off", "off"), ("0", "off"), ("REQUIRE", "require"), ("x", "auto")])
def test_triton_env_switch_mode(value: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(triton_ops.ENV_VAR, value)
    assert triton_ops.mode() == expected


def test_triton_env_switch_off_disables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(triton_ops.ENV_VAR, "off")
    assert triton_ops.available() is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_triton_not_used_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert triton_ops.unavailable_reason() == "no CUDA device"
    monkeypatch.setenv(triton_ops.ENV_VAR, "require")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        triton_ops.available()

    def fail(*args, **kwargs):
        raise AssertionError("the Triton path ran for CPU tensors")

    monkeypatch.setattr(triton_ops, "forward", fail)
    monkeypatch.setenv(triton_ops.ENV_VAR, "auto")
    monkeypatch.setenv(kernels.ENV_VAR, "off")  # the pure-torch CPU path, nothing to compile
    torch.manual_seed(0)
    layer = SplitQuantLinear.from_float(nn.Linear(40, 24), QuantSpec(2, 3))
    x = torch.randn(3, 40)
    w = dequantize_weight(layer.weight_packed, layer.weight_scale, layer.weight_offset, 40, layer.spec)
    assert torch.equal(layer(x), F.linear(x, w, layer.bias))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_triton_layer_on_cuda_matches_cpu(tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(triton_ops.ENV_VAR, "require")
    torch.manual_seed(0)
    layer = SplitQuantLinear.from_float(nn.Linear(203, 48), QuantSpec(2, 3))
    x = torch.randn(tokens, 203)
    want = layer(x)
    got = layer.to("cuda")(x.cuda())
    assert rel_err(got.cpu(), want) < 1e-5


COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from optimum_splitquant.kernels.triton_kernels import dequantize_kernel, linear_kernel

target = GPUTarget("cuda", 90, 32)
ints = dict.fromkeys(["in_features", "row_bytes", "group_size", "groups"], "i32")
sig = {"packed_ptr": "*u8", "scale_ptr": "*fp16", "offset_ptr": "*fp16", "out_ptr": "*bf16", "n_rows": "i32", **ints}
consts = {"BITS": 8, "WIDTH": 10, "K": 4, "BLOCK_R": 16, "BLOCK_C": 128}
src = ASTSource(dequantize_kernel, {**sig, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
ptx = triton.compile(src, target=target, options={"enable_fp_fusion": False}).asm["ptx"]
assert "fma.rn.f32" not in ptx, "the dequantize kernel must not fuse multiply-adds"
sig = {"x_ptr": "*fp16", "packed_ptr": "*u8", "scale_ptr": "*bf16", "offset_ptr": "*bf16", "bias_ptr": "*fp16",
       "out_ptr": "*fp16", "tokens": "i32", "n_rows": "i32", **ints}
consts = {"HAS_BIAS": True, "BITS": 4, "WIDTH": 5, "K": 2, "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 256}
src = ASTSource(linear_kernel, {**sig, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
assert triton.compile(src, target=target, options={"enable_fp_fusion": True}).asm["cubin"]
print("compiled")
"""


def test_triton_kernels_compile_for_sm90(tmp_path) -> None:
    """The compiled (not interpreted) kernels lower to a Hopper cubin; no GPU needed."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled" in done.stdout
