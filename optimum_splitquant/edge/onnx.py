"""ONNX export of split float models and ONNX Runtime INT8 quantization of the result (optional extra).

Needs ``pip install "optimum-splitquant[onnx]"`` (``onnx``, ``onnxruntime``, ``onnxscript``); nothing
here is imported by the package itself. The intended edge workflow::

    split_model(model)  # or dequantize_to_split(splitquant_model)
    export_onnx(model, inputs, "m.onnx")  # torch.onnx.export (the torch.export-based exporter)
    quantize_onnx("m.onnx", "m.int8.onnx", mode="static", calibration=feeds)

Each branch of a split layer is its own ``MatMul`` / ``Conv`` with its own weight initializer, so
ONNX Runtime's per-tensor quantizer gives every cluster its own scale: the paper's mechanism with
an off-the-shelf toolchain. The branches' zeros stay exact zeros under ONNX Runtime's symmetric
INT8 weight quantization.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["export_onnx", "onnx_feeds", "quantize_onnx", "run_onnx"]

logger = logging.getLogger(__name__)

_DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Conv")


class _Exported(nn.Module):
    """Positional-argument wrapper that returns one tensor of the wrapped model's output."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], output: str | int) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output = output

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.input_names, args, strict=True)))
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(self.output, str):
            return out[self.output]
        return out[self.output]


def export_onnx(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    output: str | int = 0,
    output_name: str | None = None,
    dynamic: bool = True,
    opset_version: int | None = None,
    external_data: bool = False,
) -> Path:
    """Export ``model`` called as ``model(**inputs)`` to ``path`` with ``torch.onnx.export``; returns the path.

    Args:
        model: any module, split or not; it is put in eval mode (and left there).
        inputs: example inputs by keyword (e.g. a tokenizer's output). Use a batch of at least 2
            and, for text, padded sequences of at least 2 tokens, so no size is specialised.
        output: the output to export when the model returns a ``ModelOutput`` / tuple: a key
            (``"last_hidden_state"``, ``"logits"``) or an index (default: the first).
        output_name: name of the ONNX output (default: ``output`` if it is a key, else ``"output"``).
        dynamic: make the batch dimension of every input dynamic, and the sequence dimension of
            2-D integer inputs (token ids, masks).
        opset_version: ONNX opset (default: the exporter's).
        external_data: store the weights in a side file ``<path>.data`` (needed above 2 GB).
    """
    model.eval()
    names = list(inputs)
    args = tuple(inputs[n] for n in names)
    dynamic_shapes = None
    if dynamic:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic_shapes = {}
        for name, t in inputs.items():
            dims = {0: batch}
            if t.dim() == 2 and not t.is_floating_point():
                dims[1] = seq
            dynamic_shapes[name] = dims
    wrapper = _Exported(model, names, output).eval()
    path = Path(path)
    out_name = output_name or (output if isinstance(output, str) else "output")
    with warnings.catch_warnings():
        # Noise from the exporter itself: one shared Dim per axis is what we want, and a torch-internal deprecation.
        warnings.filterwarnings("ignore", message=r"# The axis name", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=names,
            output_names=[out_name],
            dynamic_shapes=None if dynamic_shapes is None else {"args": tuple(dynamic_shapes[n] for n in names)},
            opset_version=opset_version,
            dynamo=True,
            external_data=external_data,
            verbose=False,
        )
    model.eval()  # the exporter restores the wrapper's mode on its children: keep the model in eval
    logger.info("exported %s to %s", type(model).__name__, path)
    return path


def onnx_feeds(inputs: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """Numpy feeds for ONNX Runtime from torch (or numpy) inputs (integer tensors as int64)."""
    feeds = {}
    for name, value in inputs.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(np.int64)
        feeds[name] = arr
    return feeds


def run_onnx(path: str | os.PathLike, inputs: Mapping[str, Any], session: Any | None = None) -> np.ndarray:
    """Run the exported model in ONNX Runtime (CPU) and return its first output."""
    import onnxruntime as ort

    if session is None:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, onnx_feeds(inputs))[0]


def quantize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    mode: str = "dynamic",
    calibration: Iterable[Mapping[str, Any]] | None = None,
    per_channel: bool = False,
    op_types: Sequence[str] = _DEFAULT_OP_TYPES,
) -> Path:
    """INT8-quantize an ONNX model with ONNX Runtime's own quantizer; returns ``dst``.

    Args:
        mode: ``"dynamic"`` (``quantize_dynamic``: INT8 weights, activation ranges computed at run
            time) or ``"static"`` (``quantize_static``, QDQ format: activation ranges calibrated
            once with MinMax on ``calibration``, UINT8 activations, INT8 weights).
        calibration: feeds (``{input name: array or tensor}``) for ``"static"``.
        per_channel: per output channel weight scales; ``False`` (default) is per-tensor, the
            basic linear quantization that edge toolchains offer and SplitQuant targets.
        op_types: operator types to quantize. The default (MatMul, Gemm, Conv) leaves softmax,
            layer norm and the attention mask addition in float, as is usual for transformers.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    if mode == "dynamic":
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
        )
    elif mode == "static":
        if calibration is None:
            raise ValueError("static quantization needs calibration feeds (an iterable of {input name: array})")
        _quantize_static(src, dst, calibration, per_channel, op_types)
    else:
        raise ValueError(f"mode must be 'dynamic' or 'static', got {mode!r}")
    logger.info("ONNX Runtime %s INT8 (%s) wrote %s", mode, "per-channel" if per_channel else "per-tensor", dst)
    return dst


def _quantize_static(
    src: str | os.PathLike,
    dst: Path,
    calibration: Iterable[Mapping[str, Any]],
    per_channel: bool,
    op_types: Sequence[str],
) -> None:
    """ONNX Runtime's ``quantize_static`` in QDQ format: MinMax-calibrated UINT8 activations, INT8 weights."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def __init__(self, feeds: Iterable[Mapping[str, Any]]) -> None:
            self._it = iter([onnx_feeds(f) for f in feeds])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    quantize_static(
        str(src),
        str(dst),
        _Reader(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(op_types),
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
