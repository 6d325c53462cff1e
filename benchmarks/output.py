"""The benchmark's outputs: machine description, JSON, Markdown tables and the quality-vs-bits plot."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine_info", "markdown", "plot", "proc_status_kib", "write_all"]

_PACKAGES = ("optimum-splitquant", "torch", "transformers", "optimum-quanto", "scikit-learn", "numpy", "safetensors")


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


def machine_info() -> dict[str, Any]:
    """CPU, cores, threads, load, OS, Python, package versions and the date (UTC)."""
    versions = {}
    for name in _PACKAGES:
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


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "perplexity":
        return f"{value:,.2f}" if value < 1e4 else f"{value:.3g}"
    if metric == "accuracy":
        return f"{100 * value:.1f} %"
    return f"{value:.4f}"


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
        "size: the saved safetensors checkpoint, or the in-memory size for optimum-quanto (not serializable "
        "through transformers). quantize s: quantization of an already loaded float model. forward: CPU time of "
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
            size = f"{row['size_bytes'] / 1e6:.1f}" + (" (mem)" if row["size_kind"] == "in memory" else "")
            quant = "-" if row["kind"] == "fp32" else f"{row['quantize_s']:.1f}"
            lines.append(
                f"| {row['method']} | {_fmt(row['value'], task['metric'])} | {row['effective_bits']:.2f} | {size} | "
                f"{quant} | {row['forward_ratio']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Quality vs effective bits per weight, one panel per task, one line per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        families: dict[str, list[tuple[float, float]]] = {}
        fp32 = None
        for row in task["rows"]:
            if row.get("error") or row["value"] is None:
                continue
            if row["kind"] == "fp32":
                fp32 = row["value"]
                continue
            families.setdefault(row["family"], []).append((row["effective_bits"], row["value"]))
        for family, points in families.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
        if fp32 is not None:
            ax.axhline(fp32, color="black", linestyle="--", linewidth=1, label="FP32")
        if task["metric"] == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("effective bits per weight")
        ax.set_ylabel(task["metric"])
        ax.set_title(task["model"].split(" (")[0], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"SplitQuant quality vs size ({result['machine']['date']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Write ``{name}.json``, ``{name}.md`` and ``{name}.png`` into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(result), encoding="utf-8")
    plot(result, paths[2])
    return paths
