"""Streaming quantization at scale: peak memory while quantizing a >= 1 B-parameter checkpoint at load.

Builds once (cached under ``~/.cache/optimum-splitquant/llama-1b-random``) a random
TinyLlama-shaped checkpoint (1.1 B parameters, bf16, several safetensors shards), then measures in
separate child processes, side by side:

* ``float``: plain ``from_pretrained`` (bf16) — the baseline;
* ``quant``: ``from_pretrained(..., quantization_config=SplitQuantConfig(bits=2))``;
* ``offload``: the saved SplitQuant model reloaded with ``device_map="auto"`` and a ``max_memory``
  that forces part of it to disk; its logits must equal the in-memory quantized model's.

Each child reports peak resident memory above its pre-load baseline twice: ``ru_maxrss`` (which
also counts the pages of the memory-mapped float checkpoint that were read: clean page cache the
kernel may drop at any time) and the peak of the anonymous part (``RssAnon``, sampled every 5 ms:
the memory the process itself allocated), compared with the quantized size plus the largest float
tensor and with the whole float model.

    python benchmarks/bench_scale.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.output import machine_info, proc_status_kib

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "optimum-splitquant" / "llama-1b-random"
SHAPE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def _rss_mib() -> float:
    return _status_mib("VmRSS")["VmRSS"]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(*keys: str) -> dict[str, float]:
    return {key: kib / 1024 for key, kib in proc_status_kib(*keys).items()}


class _AnonPeak:
    """Samples the process's anonymous resident memory (``RssAnon``) every few ms; keeps the peak.

    ``ru_maxrss`` also counts the pages of the memory-mapped checkpoint that were read (``RssFile``):
    clean page cache the kernel can drop at any time, not memory the process allocated.
    """

    def __init__(self, every_s: float = 0.005) -> None:
        import threading

        self.peak = _status_mib("RssAnon")["RssAnon"]
        self._stop = threading.Event()
        self._every = every_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, _status_mib("RssAnon")["RssAnon"])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mib("RssAnon")["RssAnon"])


def build(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (path / "config.json").is_file():
        return
    tmp = Path(tempfile.mkdtemp(dir=path.parent if path.parent.exists() else None))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.bfloat16)
    model.save_pretrained(tmp, max_shard_size="400MB")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)


def child(mode: str, src: str, qdir: str, offload_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_splitquant as osq

    torch.manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 16))
    base = _rss_mib()
    base_anon = _status_mib("RssAnon")["RssAnon"]
    sampler = _AnonPeak()
    t = time.perf_counter()
    if mode == "float":
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    elif mode == "quant":
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=osq.SplitQuantConfig(bits=2))
    else:
        budget = int(os.environ.get("SCALE_CPU_BUDGET_MB", "300"))
        model = AutoModelForCausalLM.from_pretrained(
            qdir, device_map="auto", max_memory={"cpu": f"{budget}MB"}, offload_folder=offload_dir
        )
    load_s = time.perf_counter() - t
    peak_anon = sampler.stop()
    out = {"mode": mode, "load_s": load_s, "base_mib": base, "peak_mib": _peak_mib(), "after_mib": _rss_mib()}
    out["peak_anon_above_base_mib"] = peak_anon - base_anon
    out["after_anon_above_base_mib"] = _status_mib("RssAnon")["RssAnon"] - base_anon
    out["peak_above_base_mib"] = out["peak_mib"] - base
    out["resident_above_base_mib"] = out["after_mib"] - base
    out["footprint_mib"] = model.get_memory_footprint() / 2**20
    if mode != "float":
        rep = osq.size_report(model)
        out.update(quantized_weights=rep.quantized_weights, effective_bits=rep.effective_bits)
        out["weights_per_s_M"] = rep.quantized_weights / load_s / 1e6 if mode == "quant" else None
    if mode == "offload":
        out["device_map_values"] = sorted(set(map(str, getattr(model, "hf_device_map", {}).values())))
    with torch.no_grad():
        logits = model.eval()(ids).logits.float()
    from safetensors.torch import save_file

    save_file({"logits": logits.contiguous()}, str(Path(offload_dir).parent / f"logits-{mode}.safetensors"))
    if mode == "quant":
        model.save_pretrained(qdir)
    return out


def _checkpoint_stats(shards: list[Path]) -> tuple[int, int]:
    """``(parameters, elements of the largest tensor)`` of the safetensors ``shards``, read from their headers."""
    from safetensors import safe_open

    largest = 0
    n_params = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (a safe_open handle is not iterable)
                numel = math.prod(f.get_slice(key).get_shape())
                n_params += numel
                largest = max(largest, numel)
    return n_params, largest


def _summary(
    results: dict[str, dict], n_params: int, largest: int, shards: int, build_s: float, q_bytes: int, same: bool
) -> dict:
    """The contents of ``scale.json``: the machine, the checkpoint, the three runs and their ratios."""
    machine = machine_info()
    return {
        "date": machine["date"][:10],
        "machine": f"{machine['cpu']}, {machine['cores']} cores",
        "torch": machine["versions"]["torch"],
        "transformers": machine["versions"]["transformers"],
        "params": n_params,
        "shards": shards,
        "build_s_if_not_cached": build_s,
        "largest_tensor_bf16_mib": largest * 2 / 2**20,
        "largest_tensor_fp32_mib": largest * 4 / 2**20,
        "quantized_checkpoint_mib": q_bytes / 2**20,
        "float": results["float"],
        "quant": results["quant"],
        "offload": results["offload"],
        "offload_logits_equal_in_memory": same,
        "peak_ratio_quant_vs_float": results["quant"]["peak_above_base_mib"] / results["float"]["peak_above_base_mib"],
        "float_model_bf16_mib": n_params * 2 / 2**20,
        "quant_peak_anon_vs_float_model": results["quant"]["peak_anon_above_base_mib"] / (n_params * 2 / 2**20),
        "quant_peak_anon_vs_quantized_plus_largest_fp32": results["quant"]["peak_anon_above_base_mib"]
        / (q_bytes / 2**20 + largest * 4 / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "SRC", "QDIR", "OFFLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import torch
    from safetensors.torch import load_file

    t = time.perf_counter()
    build(CACHE)
    build_s = time.perf_counter() - t
    shards = sorted(CACHE.glob("*.safetensors"))
    n_params, largest = _checkpoint_stats(shards)
    work = Path(tempfile.mkdtemp())
    qdir, offload = work / "q", work / "offload"
    offload.mkdir()
    results = {}
    for mode in ("float", "quant", "offload"):
        cmd = [sys.executable, __file__, "--child", mode, str(CACHE), str(qdir), str(offload)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    q_bytes = sum(p.stat().st_size for p in qdir.glob("*.safetensors"))
    same = torch.equal(
        load_file(str(work / "logits-quant.safetensors"))["logits"],
        load_file(str(work / "logits-offload.safetensors"))["logits"],
    )
    summary = _summary(results, n_params, largest, len(shards), build_s, q_bytes, same)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
