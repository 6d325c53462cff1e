"""Example by example: ``for_budget``'s config against an anchor family's best config at each budget.

Per pair the examples only one of them classifies right and the exact McNemar p-value; also the
compact storage of per-example predictions (:func:`digits`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from benchmarks.tables import BUDGETS, budget_table, fmt_value, scored

__all__ = ["ANCHOR_FAMILIES", "digits", "mcnemar_p", "paired_markdown", "paired_table"]

ANCHOR_FAMILIES = ("HQQ", "SINQ", "bitsandbytes NF4")
"""The calibration-free anchors ``for_budget`` is compared with, example by example (their method families)."""


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
    result: dict[str, Any],
    budgets: tuple[float, ...] | list[float] | None = None,
    anchors: tuple[str, ...] = ANCHOR_FAMILIES,
) -> dict[str, Any]:
    """Example by example, on every classification task (one with ``labels`` and per-row ``predictions``):
    per budget, ``SplitQuantConfig.for_budget(b)``'s config (``result["for_budget"]``) against each ``anchors``
    family's best config within ``b`` (the best-at-budget table), one entry per task and family measured. Per
    pair: both accuracies, the examples only one of them gets right, the exact McNemar p-value, and each one's
    agreement with FP32's predictions."""
    table = budget_table(result, budgets or (result.get("budget_table") or {}).get("budgets") or BUDGETS)
    names = result.get("for_budget") or {}
    tasks = []
    for (task, best), anchor in itertools.product(zip(result["tasks"], table["tasks"], strict=True), anchors):
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
            if not (ours and theirs and scored(ours) and ours.get("predictions") and theirs.get("predictions")):
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
        "## for_budget against the anchors, example by example",
        "",
        "Per budget: `SplitQuantConfig.for_budget(b)`'s config against each anchor's best config within the "
        "budget, on the same examples. only ours / only anchor: examples only that one classifies right. "
        "p: two-sided exact McNemar test (the binomial test on those examples); a small p (say < 0.05) means a "
        "real difference, a large one a difference within what chance gives. agree with FP32: share of "
        "examples with FP32's prediction.",
    ]
    for task in table["tasks"]:
        anchor = task["anchor"]
        lines += ["", f"### {task['model']}: accuracy, {task['pairs'][0]['examples']} examples, against {anchor}", ""]
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
                f"{fmt_value(pair['ours_value'], 'accuracy')} | {pair['anchor']} ({pair['anchor_bits']:.2f}) | "
                f"{fmt_value(pair['anchor_value'], 'accuracy')} | {pair['only_ours']} | {pair['only_anchor']} | "
                f"{pair['p_value']:.2f} | {agree} |"
            )
    return "\n".join(lines) + "\n"
