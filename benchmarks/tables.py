"""The best-at-budget table: per task, budget and method family, the best config within the budget.

Works from the results dict alone (``result["tasks"]``, each with its ``rows``).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["BUDGETS", "budget_markdown", "budget_table", "fmt_value", "higher_is_better", "scored"]

#: Default budgets (effective bits per quantized weight) of the best-at-budget table.
BUDGETS = (3.5, 4.0, 4.25, 4.5, 5.0, 6.0)


def fmt_value(value: float | None, metric: str) -> str:
    """A task metric as the tables show it (accuracy in %, perplexity with separators, ``-`` for none)."""
    if value is None:
        return "-"
    if metric == "perplexity":
        return f"{value:,.2f}" if value < 1e4 else f"{value:.3g}"
    if metric == "accuracy":
        return f"{100 * value:.1f} %"
    return f"{value:.4f}"


def higher_is_better(task: dict[str, Any]) -> bool:
    return bool(task.get("higher_is_better", task.get("metric") != "perplexity"))


def scored(row: dict[str, Any]) -> bool:
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
        higher = higher_is_better(task)
        families: list[str] = []
        for row in task["rows"]:
            family = row.get("family", row["method"])
            if row.get("kind") != "fp32" and family not in families:
                families.append(family)
        best: dict[str, list[dict[str, Any] | None]] = {}
        for family in families:
            rows = [r for r in task["rows"] if r.get("family", r["method"]) == family and scored(r)]
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
        fp32 = "" if task["fp32"] is None else f"; FP32 {fmt_value(task['fp32'], task['metric'])}"
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
                value = fmt_value(cell["value"], task["metric"])
                if cell["value"] == winner:
                    value = f"**{value}**"
                out.append(f"{value} {cell['method']} ({cell['effective_bits']:.2f})")
            lines.append(f"| <= {budget:g} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"
