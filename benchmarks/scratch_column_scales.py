"""Scratch study (not part of the package): SINQ's column scales and NF4-like levels on top of SplitQuant.

Two quality levers the calibration-free anchors use, tried on ``SplitQuantConfig.for_budget(b)``'s configs with
the package's own quantizer (``optimum_splitquant.core.quantize_weight``), nothing in the package changed:

- **column scales** (SINQ): ``W ~ Q(W / c) * c`` with one float16 scale ``c_j`` per input column, folded into
  the activations at inference (``x * c``): +16 / out_features bits per weight. ``c`` from one column-std
  normalization (``colstd``) or SINQ's Sinkhorn-style alternating row / column std normalization
  (``sinkhorn``: a port of ``sinq.sinkhorn.sinkhorn_log``, order 16, keeping only its column vector; its row
  vector is absorbed by the per-group ranges). ``sinkhorn-rc`` keeps the row vector too (another +16 / in bits),
  for coded ranges, whose fp16 steps are shared by blocks of 8 lines and so do not absorb it.
- **non-uniform levels** (NF4): the 2**bits levels of bitsandbytes' NF4 table (normal quantiles) between each
  group's offset and top, the per-group ranges fitted by least squares and stored as the package's 6-bit coded
  ranges; same bits as the uniform coded grid.

Measured on all-MiniLM-L6-v2's quantized Linear weights: weight SQNR (dB, over all layers) and the benchmark's
embedding cosine to FP32 (512 SMS texts). ``--anchors`` adds SINQ / NF4 weight SQNR (needs ``.venv-anchors``)::

    python benchmarks/scratch_column_scales.py --out benchmarks/results/column_scales
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.methods import _quantized_layers
from benchmarks.output import BUDGETS, machine_info
from benchmarks.tasks import EmbeddingCosine
from optimum_splitquant import SplitQuantConfig
from optimum_splitquant.cli import data
from optimum_splitquant.core import QuantSpec, dequantize_weight, quantize_weight
from optimum_splitquant.core.ranges import decode_ranges, encode_ranges

logger = logging.getLogger("benchmarks.column_scales")

#: bitsandbytes' NF4 table (normal quantiles in [-1, 1]); NF3 from SINQ's quantizer.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NF3 = (-1.0, -0.5350227355957031, -0.2469314038753510, 0.0, 0.1833375245332718, 0.3819939494132996,
       0.6229856610298157, 1.0)  # fmt: skip


def sinkhorn_scales(w: torch.Tensor, order: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row scales ``(c, r)`` with ``w / r[:, None] / c`` of near-equal row and column stds: a port of
    SINQ's ``sinkhorn_log`` (log-domain steps clamped to [0.7, 2], the scales of the least imbalanced step)."""
    m = w.float()

    def imbalance(x: torch.Tensor) -> torch.Tensor:
        s1, s0 = x.std(1), x.std(0)
        return torch.maximum(s1.max(), s0.max()) / torch.minimum(s1.min(), s0.min()).clamp_min(1e-12)

    target = torch.minimum(m.std(1).clamp(1e-3, 1e3).min(), m.std(0).clamp(1e-3, 1e3).min()) + 1e-6
    log_c, log_r = torch.zeros(m.shape[1]), torch.zeros(m.shape[0], 1)
    best, best_c, best_r = imbalance(m), log_c.exp(), log_r.exp()
    for _ in range(order):
        cur = m / log_c.exp() / log_r.exp()
        ib = imbalance(cur)
        if ib <= best:
            best, best_c, best_r = ib, log_c.exp(), log_r.exp()
        elif ib > best:  # SINQ stops once the imbalance rises
            break
        sc = (cur.std(0).clamp(1e-3, 1e3) / target).clamp(0.7, 2.0).log()
        sr = (cur.std(1).clamp(1e-3, 1e3)[:, None] / target).clamp(0.7, 2.0).log()
        log_c, log_r = (log_c + sc).clip(-0.3, 10.0), (log_r + sr).clip(-0.3, 10.0)
    return best_c, best_r.squeeze(1)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _normalized(v: torch.Tensor) -> torch.Tensor:
    """Scales divided by their geometric mean (the ranges absorb a common factor), rounded to float16."""
    return _fp16(v / v.log().mean().exp())


def uniform(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The package's quantizer and dequantizer, unchanged."""
    q = quantize_weight(w, spec)
    return dequantize_weight(q.packed, q.scale, q.offset, q.in_features, spec)


def table_levels(w: torch.Tensor, spec: QuantSpec, table: tuple[float, ...], iters: int = 6) -> torch.Tensor:
    """Non-uniform levels ``offset + scale * (levels - 1) * t_k`` (``t`` the table mapped to [0, 1]) per group:
    least-squares ranges alternated with nearest-level assignment, then coded as ``spec``'s ranges (or float16
    without ``range_bits``) and the weights moved to the nearest level of the stored ranges."""
    t = (torch.tensor(table) + 1) / 2 * (len(table) - 1)  # in code units, so scale keeps the uniform meaning
    mids = (t[1:] + t[:-1]) / 2
    out_f, in_f = w.shape
    g = spec.group_size or in_f
    x = w.float().reshape(-1, g)  # (lines, g), lines in row-major order
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    off, sc = lo, ((hi - lo) / t[-1]).clamp_min(1e-12)

    def assign(off: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        return t[torch.bucketize((x - off) / sc.clamp_min(1e-12), mids)]

    for _ in range(iters):
        v = assign(off, sc)
        vm, xm = v.mean(1, keepdim=True), x.mean(1, keepdim=True)
        var = ((v - vm) ** 2).mean(1, keepdim=True)
        cov = ((v - vm) * (x - xm)).mean(1, keepdim=True)
        new_sc = torch.where(var > 0, cov / var.clamp_min(1e-20), sc).clamp_min(1e-12)
        off, sc = xm - new_sc * vm, new_sc
    if spec.range_bits is not None:
        coded = encode_ranges(sc, off, spec)
        s_dec, o_dec = decode_ranges(coded, spec)
        sc, off = s_dec.float(), o_dec.float()
    else:
        sc, off = _fp16(sc), _fp16(off)
    return (off + sc * assign(off, sc)).reshape(out_f, in_f)


def variant(w: torch.Tensor, spec: QuantSpec, how: str) -> tuple[torch.Tensor, float]:
    """Quantize-dequantize ``w`` by variant ``how``; returns the reconstruction and the extra stored bits."""
    out_f, in_f = w.shape
    if how == "plain":
        return uniform(w, spec), 0.0
    if how == "nf-levels":
        return table_levels(w, spec, NF4 if spec.bits == 4 else NF3 if spec.bits == 3 else None), 0.0
    if how == "colstd":
        c = _normalized(w.float().std(0).clamp_min(1e-8))
        return uniform(w / c, spec) * c, 16 * in_f
    c, r = sinkhorn_scales(w)
    c = _normalized(c)
    if how == "sinkhorn":
        return uniform(w / c, spec) * c, 16 * in_f
    if how == "sinkhorn-rc":
        r = _normalized(r)[:, None]
        return uniform(w / r / c, spec) * r * c, 16 * in_f + 16 * out_f
    if how == "sinkhorn+nf-levels":
        table = NF4 if spec.bits == 4 else NF3
        return table_levels(w / c, spec, table) * c, 16 * in_f
    raise ValueError(how)


def anchor_sqnr(weights: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Weight SQNR and stored bits of SINQ and NF4 configs (benchmarks.methods' own quantize helpers)."""
    from benchmarks.methods import _nf4_quantize, _sinq_quantize, _tensor_bytes

    rows = []
    for name, fn in [
        ("NF4 b64", lambda w: _nf4_quantize(w, 64)),
        ("NF4 b32", lambda w: _nf4_quantize(w, 32)),
        ("SINQ 4-bit g128", lambda w: _sinq_quantize(w, 4, 128)),
        ("SINQ 4-bit g64", lambda w: _sinq_quantize(w, 4, 64)),
    ]:
        err = ref = bits = n = 0.0
        for w in weights.values():
            stored, deq = fn(w)
            err += float(((deq() - w) ** 2).sum())
            ref += float((w**2).sum())
            bits += 8 * sum(_tensor_bytes(t) for t in stored.values())
            n += w.numel()
        rows.append({"method": name, "bits": bits / n, "sqnr_db": 10 * math.log10(ref / err)})
        logger.info("%-18s bits %.3f  SQNR %.2f dB", name, bits / n, rows[-1]["sqnr_db"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/column_scales", help="output path stem (.json, .md)")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    p.add_argument("--variants", default="plain,colstd,sinkhorn,sinkhorn-rc,nf-levels,sinkhorn+nf-levels")
    p.add_argument("--no-cosine", action="store_true", help="weight SQNR only")
    p.add_argument("--anchors", action="store_true", help="also SINQ / NF4 weight SQNR (needs sinq, bitsandbytes)")
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--range-block", type=int, help="override for_budget's range_block (lines sharing coded steps)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.manual_seed(0)
    machine = machine_info()
    task = EmbeddingCosine(data.minilm_path(), n_texts=args.texts)
    fp32 = task.load()
    task.prepare(fp32)
    layers = _quantized_layers(fp32)
    weights = {n: m.weight.detach().clone() for n, m in layers.items()}
    total = sum(w.numel() for w in weights.values())
    rows: list[dict[str, Any]] = []
    result = {"machine": machine, "command": " ".join(["python", *sys.argv]), "rows": rows}
    for budget in (float(b) for b in args.budgets.split(",")):
        config = SplitQuantConfig.for_budget(budget)
        if args.range_block and config.range_bits is not None:
            config = SplitQuantConfig(**{**config.to_dict(), "range_block": args.range_block})
        spec = config.to_spec()
        base_bits = sum(spec.bits_per_weight(w.shape[1]) * w.numel() for w in weights.values()) / total
        for how in args.variants.split(","):
            if "nf-levels" in how and spec.bits not in (3, 4):
                continue
            start = time.perf_counter()
            err = ref = extra = 0.0
            for name, w in weights.items():
                w_hat, more = variant(w, spec, how)
                err += float(((w_hat - w) ** 2).sum())
                ref += float((w**2).sum())
                extra += more
                layers[name].weight.data.copy_(w_hat)
            row = {
                "budget": budget,
                "config": f"INT{spec.bits} g{spec.group_size}"
                + (f" r{spec.range_bits}" if spec.range_bits else "")
                + (f" block{spec.range_block}" if spec.range_bits and spec.range_block != 8 else ""),
                "variant": how,
                "bits": base_bits + extra / total,
                "sqnr_db": 10 * math.log10(ref / err),
                "quantize_s": round(time.perf_counter() - start, 1),
            }
            if not args.no_cosine:
                row["cosine"] = task.score(fp32)
            for name, w in weights.items():  # back to float for the next variant
                layers[name].weight.data.copy_(w)
            rows.append(row)
            logger.info("%s", row)
            _write(result, Path(args.out))  # after every row: a long run keeps what it did
    if args.anchors:
        result["anchors"] = anchor_sqnr(weights)
        _write(result, Path(args.out))
    return 0


def _write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Column scales and non-uniform levels on for_budget configs (scratch study)",
        "",
        f"{m['date']}; {m['cpu']}, {m['cores']} cores, load average at start {m['load_average_at_start']}; "
        f"torch {m['versions'].get('torch')}. Command: `{result['command']}`. all-MiniLM-L6-v2, quantized Linear "
        "weights; SQNR over all of them; cosine: mean cosine of mean-pooled embeddings to FP32 (512 SMS texts).",
        "",
        "| budget | for_budget config | variant | bits/weight | weight SQNR dB | cosine to FP32 |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        cos = f"{r['cosine']:.4f}" if "cosine" in r else "-"
        lines.append(
            f"| {r['budget']:g} | {r['config']} | {r['variant']} | {r['bits']:.3f} | {r['sqnr_db']:.2f} | {cos} |"
        )
    if result.get("anchors"):
        lines += ["", "| anchor | bits/weight | weight SQNR dB |", "|---|---:|---:|"]
        lines += [f"| {a['method']} | {a['bits']:.3f} | {a['sqnr_db']:.2f} |" for a in result["anchors"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
