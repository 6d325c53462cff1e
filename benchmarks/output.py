"""The benchmarks' outputs: machine description, JSON, Markdown tables, the best-at-budget table and the plot.

:func:`machine_info` is the one machine description every benchmark records. Everything else works
from the results dict alone, so a saved JSON can be turned into tables and a plot again without
rerunning anything (:func:`rewrite`, ``bench_quality.py --table-from``). The best-at-budget table
lives in :mod:`benchmarks.tables`, the example-by-example comparison in :mod:`benchmarks.paired`,
the plot in :mod:`benchmarks.plot`; all re-exported here.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from benchmarks.paired import digits, mcnemar_p, paired_markdown, paired_table
from benchmarks.plot import plot
from benchmarks.tables import BUDGETS, budget_markdown, budget_table, fmt_value

__all__ = [
    "BUDGETS",
    "budget_markdown",
    "budget_table",
    "digits",
    "machine_info",
    "markdown",
    "mcnemar_p",
    "paired_markdown",
    "paired_table",
    "plot",
    "proc_status_kib",
    "rewrite",
    "write_all",
]

_PACKAGES = (
    "optimum-splitquant",
    "torch",
    "transformers",
    "optimum-quanto",
    "hqq",
    "sinq",
    "bitsandbytes",
    "scikit-learn",
    "numpy",
    "safetensors",
)


def proc_status_kib(*keys: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` (``VmRSS``, ``RssAnon``, ``RssFile``, ``VmHWM``, ...) in KiB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0])
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(packages: Iterable[str] = _PACKAGES) -> dict[str, Any]:
    """CPU, cores, threads, load, OS, Python, the versions of ``packages`` (``None``: not installed) and the date (UTC)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": None if load is None else [round(x, 2) for x in load],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def markdown(result: dict[str, Any]) -> str:
    """All tasks as Markdown tables, with the machine and versions."""
    m = result["machine"]
    v = m["versions"]
    lines = [
        "# SplitQuant quality benchmark",
        "",
        f"{m['date']}; {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"load average at start {m['load_average_at_start']}; Python {m['python']}, "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + f". Command: `{result['command']}`.",
        "",
        "bits/weight: stored bits of the quantized layers (codes, cluster ids, scales, offsets or shifts) per "
        "original weight, over the same layers for every method (task head and tied embeddings stay float). "
        "size: the saved safetensors checkpoint, or the in-memory size for optimum-quanto, HQQ, SINQ and "
        "bitsandbytes NF4 (not saved through this benchmark). quantize s: quantization of an already loaded float model. forward: CPU time of "
        "one fixed batch relative to FP32, min of interleaved runs in the same process.",
    ]
    for task in result["tasks"]:
        lines += ["", f"## {task['model']}: {task['metric']}", "", f"{task['data']}.", ""]
        lines += [
            f"| method | {task['metric']} | bits/weight | size MB | quantize s | forward vs FP32 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in task["rows"]:
            if row.get("error"):
                lines.append(f"| {row['method']} | error: {row['error']} | | | | |")
                continue
            if row.get("na"):
                lines.append(f"| {row['method']} | n/a: {row['na']} | | | | |")
                continue
            size = f"{row['size_bytes'] / 1e6:.1f}" + (" (mem)" if row["size_kind"] == "in memory" else "")
            quant = "-" if row["kind"] == "fp32" else f"{row['quantize_s']:.1f}"
            lines.append(
                f"| {row['method']} | {fmt_value(row['value'], task['metric'])} | {row['effective_bits']:.2f} | {size} | "
                f"{quant} | {row['forward_ratio']:.2f}x |"
            )
    table = result.get("budget_table") or budget_table(result)
    if any(t["families"] for t in table["tasks"]):
        lines += ["", budget_markdown(table).rstrip("\n")]
    paired = result.get("paired") or paired_table(result, table["budgets"])
    if paired["tasks"]:
        lines += ["", paired_markdown(paired).rstrip("\n")]
    return "\n".join(lines) + "\n"


def write_all(
    result: dict[str, Any], out_dir: Path, name: str, budgets: tuple[float, ...] | list[float] | None = None
) -> list[Path]:
    """Write ``{name}.json``, ``{name}.md`` and ``{name}.png`` into ``out_dir``; returns the paths.

    The best-at-budget table is (re)computed into ``result["budget_table"]`` first, for ``budgets`` (default:
    those of an existing table in ``result``, else BUDGETS).
    """
    if budgets is None:
        budgets = (result.get("budget_table") or {}).get("budgets") or BUDGETS
    result["budget_table"] = budget_table(result, budgets)
    result["paired"] = paired_table(result, budgets)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(result), encoding="utf-8")
    plot(result, paths[2])
    return paths


def rewrite(
    sources: list[Path],
    out_dir: Path | None = None,
    name: str | None = None,
    budgets: tuple[float, ...] | list[float] | None = None,
    for_budget: dict[str, str] | None = None,
) -> list[Path]:
    """Regenerate the JSON (with its best-at-budget table), Markdown and plot from saved result JSON(s),
    running nothing. Several JSONs are merged: their tasks concatenated, machine and command of the first
    (each other source's command is kept in ``merged_from``). Output: ``out_dir`` (default: the first
    JSON's folder) / ``name`` (default: the first JSON's stem). ``for_budget`` (budget -> method name) is
    used where a source did not record the ``for_budget`` configs it ran with."""
    results = [json.loads(Path(p).read_text(encoding="utf-8")) for p in sources]
    merged = dict(results[0])
    if len(results) > 1:
        merged["tasks"] = [t for r in results for t in r["tasks"]]
        merged["merged_from"] = [
            {"file": str(p), "command": r.get("command")} for p, r in zip(sources, results, strict=True)
        ]
        merged.pop("budget_table", None)
    merged.pop("paired", None)
    if for_budget and not merged.get("for_budget"):
        merged["for_budget"] = for_budget
    first = Path(sources[0])
    return write_all(merged, out_dir or first.parent, name or first.stem, budgets)
