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

#: Default budgets (effective bits per quantized weight) of the best-at-budget table.
BUDGETS = (3.5, 4.0, 4.25, 4.5, 5.0, 6.0)

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
                f"| {row['method']} | {_fmt(row['value'], task['metric'])} | {row['effective_bits']:.2f} | {size} | "
                f"{quant} | {row['forward_ratio']:.2f}x |"
            )
    table = result.get("budget_table") or budget_table(result)
    if any(t["families"] for t in table["tasks"]):
        lines += ["", budget_markdown(table).rstrip("\n")]
    paired = result.get("paired") or paired_table(result, table["budgets"])
    if paired["tasks"]:
        lines += ["", paired_markdown(paired).rstrip("\n")]
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


def digits(classes: list[int]) -> str:
    """Class indices 0-9 as one string of digits (one character per example: compact in the JSON)."""
    bad = [c for c in classes if not 0 <= int(c) <= 9]
    if bad:
        raise ValueError(f"class indices must be 0-9 to be kept as digits, got {bad[:3]}")
    return "".join(str(int(c)) for c in classes)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value of two classifiers scored on the same examples: ``only_a`` examples
    only the first gets right, ``only_b`` only the second; under "equally accurate" each such example is a
    fair coin (the binomial test on the discordant pairs)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_table(
    result: dict[str, Any], budgets: tuple[float, ...] | list[float] | None = None, anchor: str = "HQQ"
) -> dict[str, Any]:
    """Example by example, on every classification task (one with ``labels`` and per-row ``predictions``):
    per budget, ``SplitQuantConfig.for_budget(b)``'s config (``result["for_budget"]``) against the ``anchor``
    family's best config within ``b`` (the best-at-budget table). Per pair: both accuracies, the examples only
    one of them gets right, the exact McNemar p-value, and each one's agreement with FP32's predictions."""
    table = budget_table(result, budgets or (result.get("budget_table") or {}).get("budgets") or BUDGETS)
    names = result.get("for_budget") or {}
    tasks = []
    for task, best in zip(result["tasks"], table["tasks"], strict=True):
        labels = task.get("labels")
        if not labels:
            continue
        rows = {r["method"]: r for r in task["rows"]}
        fp32 = next((r.get("predictions") for r in task["rows"] if r.get("kind") == "fp32"), None)
        pairs = []
        for i, budget in enumerate(table["budgets"]):
            ours = rows.get(names.get(f"{budget:g}", ""))
            cell = best["best"].get(anchor, [None] * len(table["budgets"]))[i]
            theirs = rows.get(cell["method"]) if cell else None
            if not (ours and theirs and _scored(ours) and ours.get("predictions") and theirs.get("predictions")):
                continue
            a, b = ours["predictions"], theirs["predictions"]
            if not len(a) == len(b) == len(labels):
                raise ValueError(
                    f"{task.get('task')}: {len(a)} and {len(b)} predictions for {len(labels)} labels "
                    f"({ours['method']}, {theirs['method']})"
                )
            only_a = sum(x == t != y for x, y, t in zip(a, b, labels, strict=True))
            only_b = sum(y == t != x for x, y, t in zip(a, b, labels, strict=True))
            pair = {
                "budget": budget,
                "ours": ours["method"],
                "ours_value": ours["value"],
                "ours_bits": ours["effective_bits"],
                "anchor": theirs["method"],
                "anchor_value": theirs["value"],
                "anchor_bits": theirs["effective_bits"],
                "only_ours": only_a,
                "only_anchor": only_b,
                "p_value": mcnemar_p(only_a, only_b),
                "examples": len(labels),
            }
            if fp32 and len(fp32) == len(labels):
                pair["ours_agree_fp32"] = sum(x == f for x, f in zip(a, fp32, strict=True)) / len(labels)
                pair["anchor_agree_fp32"] = sum(y == f for y, f in zip(b, fp32, strict=True)) / len(labels)
            pairs.append(pair)
        if pairs:
            tasks.append({"task": task.get("task"), "model": task.get("model"), "anchor": anchor, "pairs": pairs})
    return {"budgets": table["budgets"], "tasks": tasks}


def paired_markdown(table: dict[str, Any]) -> str:
    """The example-by-example comparison (from :func:`paired_table`) as Markdown, one table per task."""
    lines = [
        "## for_budget against the anchor, example by example",
        "",
        "Per budget: `SplitQuantConfig.for_budget(b)`'s config against the anchor's best config within the "
        "budget, on the same examples. only ours / only anchor: examples only that one classifies right. "
        "p: two-sided exact McNemar test (the binomial test on those examples); a small p (say < 0.05) means a "
        "real difference, a large one a difference within what chance gives. agree with FP32: share of "
        "examples with FP32's prediction.",
    ]
    for task in table["tasks"]:
        anchor = task["anchor"]
        lines += ["", f"### {task['model']}: accuracy, {task['pairs'][0]['examples']} examples", ""]
        lines += [
            f"| budget | for_budget config | accuracy | best {anchor} | accuracy | only ours | only {anchor} | p | "
            f"agree with FP32 (ours / {anchor}) |",
            "|---:|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for pair in task["pairs"]:
            agree = (
                f"{100 * pair['ours_agree_fp32']:.1f} / {100 * pair['anchor_agree_fp32']:.1f} %"
                if "ours_agree_fp32" in pair
                else "-"
            )
            lines.append(
                f"| <= {pair['budget']:g} | {pair['ours']} ({pair['ours_bits']:.2f}) | "
                f"{_fmt(pair['ours_value'], 'accuracy')} | {pair['anchor']} ({pair['anchor_bits']:.2f}) | "
                f"{_fmt(pair['anchor_value'], 'accuracy')} | {pair['only_ours']} | {pair['only_anchor']} | "
                f"{pair['p_value']:.2f} | {agree} |"
            )
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
