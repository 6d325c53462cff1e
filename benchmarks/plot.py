"""The quality-vs-bits plot: one panel per task, one marker set and frontier line per method family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.tables import higher_is_better, scored

__all__ = ["plot"]


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
        if scored(row) and row["family"] not in order:
            order.append(row["family"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.6 * len(tasks), 6.4), 4.0), squeeze=False)
    legend: dict[str, Any] = {}
    for ax, task in zip(axes[0], tasks, strict=True):
        families: dict[str, list[tuple[float, float]]] = {}
        fp32 = None
        for row in task["rows"]:
            if row.get("kind") == "fp32" and row.get("value") is not None:
                fp32 = row["value"]
            elif scored(row):
                families.setdefault(row["family"], []).append((row["effective_bits"], row["value"]))
        higher = higher_is_better(task)
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
