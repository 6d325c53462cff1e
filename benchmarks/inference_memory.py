"""Section 4 of ``bench_inference.py``: memory of SmolLM2-135M, each model kind in a fresh child process.

RSS above the pre-load baseline after loading FP32, INT2 quantized at load, and the saved INT2
checkpoint reloaded; ``get_memory_footprint()`` against the bytes of the model's tensors. Run as a
script, this module is the child: ``python benchmarks/inference_memory.py KIND FOLDER``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import optimum_splitquant as osq
from benchmarks.output import proc_status_kib

__all__ = ["bench_memory", "memory_child"]


def _status_kib() -> dict[str, int]:
    return proc_status_kib("VmRSS", "RssAnon", "RssFile", "VmHWM")


def _malloc_trim() -> bool:
    """Return freed heap pages to the OS (glibc); False where unavailable."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def memory_child(kind: str, folder: str) -> None:
    """Child process: RSS before loading, after loading, after a short generation; prints one JSON line.

    Safetensors are memory-mapped, so pages count in RSS only once touched: the comparable figure
    is RSS after the model has run once (every weight read).
    """
    from transformers import AutoModelForCausalLM

    gc.collect()
    before = _status_kib()
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if kind == "int2-at-load":
        kwargs["quantization_config"] = osq.SplitQuantConfig(bits=2)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    gc.collect()
    loaded = _status_kib()
    seen, tensor_bytes = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensor_bytes += t.numel() * t.element_size()
    with torch.no_grad():
        model.generate(torch.tensor([[1, 504, 3158, 282]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    gc.collect()
    ran = _status_kib()
    _malloc_trim()
    trimmed = _status_kib()

    def delta(now: dict[str, int]) -> dict[str, int]:
        return {k: (now[k] - before[k]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}

    print(
        json.dumps(
            {
                "kind": kind,
                "baseline_rss_bytes": before["VmRSS"] * 1024,
                "after_load": delta(loaded),
                "after_generate": delta(ran),
                "after_generate_malloc_trim": delta(trimmed),
                "attributable_bytes": (ran["VmRSS"] - before["VmRSS"]) * 1024,
                "peak_rss_bytes": trimmed["VmHWM"] * 1024,
                "memory_footprint_bytes": model.get_memory_footprint(),
                "tensor_bytes": tensor_bytes,
            }
        )
    )


def bench_memory(folder: Path, saved: Path | None, quick: bool) -> dict[str, Any]:
    """Section 4 of ``bench_inference.py``: each model kind loaded in a fresh child process; printed and returned."""
    runs = [("fp32", folder)]
    if not quick:
        runs.append(("int2-at-load", folder))
    if saved is not None:
        runs.append(("int2-saved", saved))
    results = {}
    for kind, path in runs:
        proc = subprocess.run(
            [sys.executable, __file__, kind, str(path)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {kind} failed:\n{proc.stderr[-3000:]}")
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["fp32"]["attributable_bytes"]
    mib = 2**20
    print("\n## 4. Memory, SmolLM2-135M, each in a fresh process: RSS above the pre-load baseline")
    print("   (after load + a 4-token generation, so every memory-mapped weight page has been touched)")
    print(
        f"  {'model':13s} {'RSS':>10s} {'vs FP32':>8s} {'anon':>10s} {'file':>10s} {'trimmed':>10s} {'footprint()':>12s} {'tensors':>10s} {'RSS at load':>12s}"
    )
    for kind, r in results.items():
        r["ratio_vs_fp32"] = r["attributable_bytes"] / base
        g, tr = r["after_generate"], r["after_generate_malloc_trim"]
        print(
            f"  {kind:13s} {g['VmRSS'] / mib:6.1f} MiB {r['ratio_vs_fp32']:7.1%} {g['RssAnon'] / mib:6.1f} MiB "
            f"{g['RssFile'] / mib:6.1f} MiB {tr['VmRSS'] / mib:6.1f} MiB {r['memory_footprint_bytes'] / mib:8.1f} MiB "
            f"{r['tensor_bytes'] / mib:6.1f} MiB {r['after_load']['VmRSS'] / mib:8.1f} MiB"
        )
    print(
        "  anon/file: anonymous and file-backed (mmapped checkpoint) parts of RSS; trimmed: after malloc_trim(0);\n"
        "  footprint(): model.get_memory_footprint(); tensors: bytes of the distinct parameters and buffers"
    )
    return results


if __name__ == "__main__":
    memory_child(*sys.argv[1:3])
