"""The benchmark's outputs: machine description, JSON, Markdown tables, the best-at-budget table and the plot.

Everything but :func:`machine_info` works from the results dict alone, so a saved JSON can be turned into
tables and a plot again without rerunning anything (:func:`rewrite`, ``bench_quality.py --table-from``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BUDGETS",
    "budget_markdown",
    "budget_table",
    "machine_info",
    "markdown",
    "plot",
    "proc_status_kib",
    "rewrite",
    "write_all",
]

#: Default budgets (effective bits per quantized weight) of the best-at-budget table.
BUDGETS = (3.5, 4.0, 4.25, 4.5, 5.0, 6.0)

_PACKAGES = (
    "optimum-splitquant",
    "torch",
    "transformers",
    "optimum-quanto",
    "hqq",
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
        "size: the saved safetensors checkpoint, or the in-memory size for optimum-quanto and HQQ (not serializable "
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
            if row.get("na"):
                lines.append(f"| {row['method']} | n/a: {row['na']} | | | | |")
                continue
            size = f"{row['size_bytes'] / 1e6:.1f}" + (" (mem)" if row["size_kind"] == "in memory" else "")
            quant = "-" if row["kind"] == "fp32" else f"{row['quantize_s']:.1f}"
            lines.append(
                f"| {row['method']} | {_fmt(row['value'], task['metric'])} | {row['effective_bits']:.2f} | {size} | "
                f"{quant} | {row['forward_ratio']:.2f}x |"
            )
    table = result.get("budget_table") or budget_table(result)
    if any(t["families"] for t in table["tasks"]):
        lines += ["", budget_markdown(table).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _higher_is_better(task: dict[str, Any]) -> bool:
    return bool(task.get("higher_is_better", task.get("metric") != "perplexity"))


def _scored(row: dict[str, Any]) -> bool:
    """A quantized row with a usable value and bit count (not FP32, not failed, not n/a, not NaN)."""
    value, bits = row.get("value"), row.get("effective_bits")
    return (
        row.get("kind") != "fp32"
        and not row.get("error")
        and not row.get("na")
        and value is not None
        and bits is not None
        and not math.isnan(value)
    )


def budget_table(result: dict[str, Any], budgets: tuple[float, ...] | list[float] = BUDGETS) -> dict[str, Any]:
    """Per task, budget and method family: the best measured config whose effective bits on that task are
    <= the budget (``None``: none within budget). "Best" follows the task's ``higher_is_better`` (perplexity:
    lower); ties go to the config with fewer bits. Families are listed in order of first appearance."""
    budgets = [float(b) for b in budgets]
    tasks = []
    for task in result["tasks"]:
        higher = _higher_is_better(task)
        families: list[str] = []
        for row in task["rows"]:
            family = row.get("family", row["method"])
            if row.get("kind") != "fp32" and family not in families:
                families.append(family)
        best: dict[str, list[dict[str, Any] | None]] = {}
        for family in families:
            rows = [r for r in task["rows"] if r.get("family", r["method"]) == family and _scored(r)]
            cells: list[dict[str, Any] | None] = []
            for budget in budgets:
                fits = [r for r in rows if r["effective_bits"] <= budget + 1e-9]
                if not fits:
                    cells.append(None)
                    continue
                top = min(fits, key=lambda r: (-r["value"] if higher else r["value"], r["effective_bits"]))
                cells.append({"method": top["method"], "value": top["value"], "effective_bits": top["effective_bits"]})
            best[family] = cells
        fp32 = [r["value"] for r in task["rows"] if r.get("kind") == "fp32" and r.get("value") is not None]
        tasks.append(
            {
                "task": task.get("task"),
                "model": task.get("model"),
                "metric": task.get("metric"),
                "higher_is_better": higher,
                "fp32": fp32[0] if fp32 else None,
                "families": families,
                "best": best,
            }
        )
    return {"budgets": budgets, "tasks": tasks}


def budget_markdown(table: dict[str, Any]) -> str:
    """The best-at-budget table (from :func:`budget_table`) as Markdown: one table per task, a row per
    budget, a column per family; each cell the value, the config and its bits/weight; bold the best."""
    budgets = table["budgets"]
    lines = [
        "## Best at a bits-per-weight budget",
        "",
        "For each budget and method family: the best measured config of that family whose bits/weight on that "
        "task are at most the budget: value, config (bits/weight). -: none of the family within budget. "
        "Bold: the best family at that budget.",
    ]
    for task in table["tasks"]:
        families = task["families"]
        if not families:
            continue
        direction = "higher" if task["higher_is_better"] else "lower"
        fp32 = "" if task["fp32"] is None else f"; FP32 {_fmt(task['fp32'], task['metric'])}"
        lines += ["", f"### {task['model']}: {task['metric']} ({direction} is better{fp32})", ""]
        lines += ["| budget | " + " | ".join(families) + " |", "|---:|" + "---|" * len(families)]
        for i, budget in enumerate(budgets):
            cells = [task["best"][f][i] for f in families]
            values = [c["value"] for c in cells if c is not None]
            winner = (max if task["higher_is_better"] else min)(values) if values else None
            out = []
            for cell in cells:
                if cell is None:
                    out.append("-")
                    continue
                value = _fmt(cell["value"], task["metric"])
                if cell["value"] == winner:
                    value = f"**{value}**"
                out.append(f"{value} {cell['method']} ({cell['effective_bits']:.2f})")
            lines.append(f"| <= {budget:g} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def _front(points: list[tuple[float, float]], higher: bool) -> list[tuple[float, float]]:
    """The points not beaten by a point with fewer (or as many) bits: the family's quality-vs-bits frontier."""
    front: list[tuple[float, float]] = []
    for bits, value in sorted(points, key=lambda p: (p[0], -p[1] if higher else p[1])):
        if not front or (value > front[-1][1] if higher else value < front[-1][1]):
            front.append((bits, value))
    return front


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def plot(result: dict[str, Any], path: Path) -> None:
    """Quality vs effective bits per weight, one panel per task; every method family is one marker set (all its
    configs) and one line through its frontier (the configs no cheaper config of the family beats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    order: list[str] = []  # one colour and marker per family, the same in every panel
    for row in (r for task in tasks for r in task["rows"]):
        if _scored(row) and row["family"] not in order:
            order.append(row["family"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.6 * len(tasks), 6.4), 4.0), squeeze=False)
    legend: dict[str, Any] = {}
    for ax, task in zip(axes[0], tasks, strict=True):
        families: dict[str, list[tuple[float, float]]] = {}
        fp32 = None
        for row in task["rows"]:
            if row.get("kind") == "fp32" and row.get("value") is not None:
                fp32 = row["value"]
            elif _scored(row):
                families.setdefault(row["family"], []).append((row["effective_bits"], row["value"]))
        higher = _higher_is_better(task)
        for family, points in families.items():
            i = order.index(family)
            color, marker = f"C{i % 10}", _MARKERS[i % len(_MARKERS)]
            front = _front(points, higher)
            (legend[family],) = ax.plot(
                [p[0] for p in front], [p[1] for p in front], color=color, marker=marker, label=family
            )
            rest = [p for p in points if p not in front]
            if rest:
                ax.scatter([p[0] for p in rest], [p[1] for p in rest], color=color, marker=marker, alpha=0.35)
        if fp32 is not None:
            legend["FP32"] = ax.axhline(fp32, color="black", linestyle="--", linewidth=1, label="FP32")
        if task["metric"] == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("effective bits per weight")
        ax.set_ylabel(task["metric"])
        ax.set_title(task["model"].split(" (")[0], fontsize=10)
        ax.grid(alpha=0.3)
    labels = [f for f in order if f in legend] + (["FP32"] if "FP32" in legend else [])
    axes[0][0].legend([legend[f] for f in labels], labels, fontsize=7)
    fig.suptitle(f"SplitQuant quality vs size ({result['machine']['date']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
) -> list[Path]:
    """Regenerate the JSON (with its best-at-budget table), Markdown and plot from saved result JSON(s),
    running nothing. Several JSONs are merged: their tasks concatenated, machine and command of the first
    (each other source's command is kept in ``merged_from``). Output: ``out_dir`` (default: the first
    JSON's folder) / ``name`` (default: the first JSON's stem)."""
    results = [json.loads(Path(p).read_text(encoding="utf-8")) for p in sources]
    merged = dict(results[0])
    if len(results) > 1:
        merged["tasks"] = [t for r in results for t in r["tasks"]]
        merged["merged_from"] = [
            {"file": str(p), "command": r.get("command")} for p, r in zip(sources, results, strict=True)
        ]
        merged.pop("budget_table", None)
    first = Path(sources[0])
    return write_all(merged, out_dir or first.parent, name or first.stem, budgets)
