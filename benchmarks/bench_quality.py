"""Quality, size and speed of SplitQuant against plain min-max and optimum-quanto on real models and data.

Tasks (all offline): all-MiniLM-L6-v2 embedding cosine to FP32 on real SMS texts; the demo's MiniLM
SMS spam classifier accuracy (built and cached on first use); BBC News 5-topic accuracy of a
probe trained on FP32 features; SmolLM2-135M perplexity on held-out BBC News text (converted
once from the shipped GGUF; ``--no-smollm`` skips it). Methods: see :mod:`benchmarks.methods`.
Writes ``quality.json``, ``quality.md`` and ``quality.png`` to ``--out``::

    python benchmarks/bench_quality.py --out benchmarks/results        # full run (about 1 h on 2 cores)
    python benchmarks/bench_quality.py --quick --out /tmp/bench        # tiny inputs, few methods
    python benchmarks/bench_quality.py --methods frontier --name frontier   # HQQ + SplitQuant grids
    python benchmarks/bench_quality.py --table-from benchmarks/results/frontier.json   # redo tables, plot
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SINQ_AUTO_PATCH", "0")  # for child processes; see _restart_without_sinq_patch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from torch import nn

from benchmarks.methods import (
    METHOD_SETS,
    Applied,
    Method,
    all_methods,
    apply_method,
    for_budget_names,
    quick_methods,
    safetensors_bytes,
    select_methods,
    unsupported,
)
from benchmarks.output import BUDGETS, digits, machine_info, rewrite, write_all
from benchmarks.tasks import BbcProbe, EmbeddingCosine, Perplexity, SmsAccuracy, Task
from optimum_splitquant.cli import data

__all__ = ["build_tasks", "main", "run_task", "time_forward"]

logger = logging.getLogger("benchmarks.quality")

TASK_NAMES = ("minilm", "sms", "bbc", "smollm")


@torch.no_grad()
def time_forward(
    fp32: nn.Module, model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int
) -> tuple[float, float]:
    """Min-of-``repeats`` seconds of one forward of ``fp32`` and of ``model`` on ``inputs``, interleaved."""
    fp32(**inputs)
    model(**inputs)
    a, b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        fp32(**inputs)
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        model(**inputs)
        b.append(time.perf_counter() - start)
    return min(a), min(b)


def run_task(task: Task, methods: list[Method], workdir: Path, repeats: int, *, collect: bool = True) -> dict[str, Any]:
    """Score every method on ``task``; a failing method is recorded with its error, the others still run.

    A method that cannot apply to the task's model (a group size that does not divide a layer width,
    see :func:`benchmarks.methods.unsupported`) is recorded as n/a (``row["na"]``) without running.

    ``collect`` runs the garbage collector after each method (frees big models early; ~0.3 s a call).
    """
    logger.info("task %s: %s", task.name, task.data_desc)
    fp32 = task.load()
    task.prepare(fp32)
    inputs = task.inputs()
    rows = []
    for method in methods:
        row: dict[str, Any] = {
            "method": method.name,
            "family": method.family,
            "kind": method.kind,
            "bits": method.bits,
            "num_clusters": method.num_clusters,
            "group_size": method.group_size,
            "fit": method.fit if method.kind == "splitquant" else None,
        }
        reason = unsupported(method, fp32)
        if reason:
            logger.info("  %-24s n/a: %s", method.name, reason)
            rows.append({**row, "na": reason})
            continue
        applied = None
        try:
            if method.kind == "fp32":  # the reference itself: ratio 1 by definition
                applied = Applied(fp32, 32.0, 0.0, safetensors_bytes(fp32, workdir, method.slug), "safetensors")
            else:
                applied = apply_method(method, task.load, workdir)
            start = time.perf_counter()
            task.predictions = None
            row["value"] = task.score(applied.model)
            row["score_s"] = round(time.perf_counter() - start, 2)
            if task.predictions is not None:  # kept for the example-by-example comparison (output.paired_table)
                row["predictions"] = digits(task.predictions)
            if method.kind == "fp32":
                fp32_s = model_s = time_forward(fp32, fp32, inputs, repeats)[0]
            else:
                fp32_s, model_s = time_forward(fp32, applied.model, inputs, repeats)
            row.update(
                effective_bits=applied.effective_bits,
                size_bytes=applied.size_bytes,
                size_kind=applied.size_kind,
                quantize_s=round(applied.quantize_s, 2),
                fp32_forward_ms=round(1000 * fp32_s, 2),
                forward_ms=round(1000 * model_s, 2),
                forward_ratio=model_s / fp32_s,
            )
            if applied.nominal_bits is not None:
                row["nominal_bits"] = applied.nominal_bits
            logger.info(
                "  %-24s %s=%.4f  bits=%.3f  quantize %.1f s  forward x%.2f",
                method.name,
                task.metric,
                row["value"],
                applied.effective_bits,
                applied.quantize_s,
                row["forward_ratio"],
            )
        except Exception as exc:  # one broken method must not lose a half-hour run
            logger.exception("  %s failed", method.name)
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        finally:
            del applied
            if collect:
                gc.collect()
        rows.append(row)
    del fp32
    gc.collect()
    out = {**task.describe(), "rows": rows}
    labels = task.labels()
    if labels is not None:
        out["labels"] = digits(labels)
    return out


def build_tasks(args: argparse.Namespace) -> list[Task]:
    """The tasks selected by ``args`` (paths default to the shipped / cached real models)."""
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(TASK_NAMES))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {TASK_NAMES}")
    minilm = Path(args.minilm) if args.minilm else data.minilm_path()
    quick = args.quick
    tasks: list[Task] = []
    for name in wanted:
        if name == "minilm":
            tasks.append(EmbeddingCosine(minilm, n_texts=16 if quick else 512))
        elif name == "sms":
            if args.classifier:
                classifier = Path(args.classifier)
            else:
                from optimum_splitquant.cli.demo import ensure_classifier

                classifier = ensure_classifier()[0]
            tasks.append(SmsAccuracy(classifier, limit=32 if quick else None))
        elif name == "bbc":
            tasks.append(BbcProbe(minilm, n_train=25 if quick else 1000, n_test=10 if quick else 445))
        elif name == "smollm" and not args.no_smollm:
            path = Path(args.smollm) if args.smollm else data.smollm_path()
            tasks.append(Perplexity(path, n_tokens=128 if quick else 4096, window=64 if quick else 512))
    return tasks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", help="output folder (default: benchmarks/results; with --table-from: the first JSON's folder)"
    )
    p.add_argument("--name", help="output file stem (default: quality; with --table-from: the first JSON's stem)")
    p.add_argument("--quick", action="store_true", help="tiny inputs and one method per kind (for tests)")
    p.add_argument("--tasks", default=",".join(TASK_NAMES), help=f"comma-separated subset of {TASK_NAMES}")
    p.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2 perplexity task")
    p.add_argument("--minilm", help="MiniLM folder (default: the shipped all-MiniLM-L6-v2)")
    p.add_argument("--classifier", help="SMS classifier folder (default: the demo's cached one)")
    p.add_argument("--smollm", help="causal LM folder (default: SmolLM2-135M converted from the shipped GGUF)")
    p.add_argument(
        "--methods",
        help=f"comma-separated set names {list(METHOD_SETS)}, method names or glob patterns such as 'HQQ*' "
        "(default: the 'default' set; with --quick: 'quick')",
    )
    p.add_argument("--list-methods", action="store_true", help="print the selected methods and exit")
    p.add_argument(
        "--budgets",
        help="comma-separated bits-per-weight budgets of the best-at-budget table "
        f"(default {','.join(f'{b:g}' for b in BUDGETS)})",
    )
    p.add_argument(
        "--table-from",
        nargs="+",
        metavar="JSON",
        help="run nothing: rewrite the Markdown, the plot and the best-at-budget table from saved result JSON(s) "
        "(several are merged task by task; then give --name)",
    )
    p.add_argument("--repeats", type=int, help="timing repeats (default 5, quick 1)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    hf_logging = transformers.utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return _run(args, argv)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _budgets(args: argparse.Namespace) -> tuple[float, ...] | None:
    if not args.budgets:
        return None
    try:
        return tuple(float(b) for b in args.budgets.split(",") if b.strip())
    except ValueError as exc:
        raise SystemExit(f"--budgets: {exc}") from None


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    budgets = _budgets(args)
    if args.table_from:
        if len(args.table_from) > 1 and not args.name:
            raise SystemExit("--table-from with several JSON files needs --name")
        paths = rewrite(
            [Path(p) for p in args.table_from],
            args.out and Path(args.out),
            args.name,
            budgets,
            for_budget=for_budget_names(budgets or BUDGETS),
        )
        logger.info("wrote %s", ", ".join(str(p) for p in paths))
        return 0
    if args.methods:
        try:
            methods = select_methods(args.methods)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    else:
        methods = quick_methods() if args.quick else all_methods()
    if args.list_methods:
        for m in methods:
            print(f"{m.name}\t{m.family}")
        return 0
    torch.manual_seed(0)
    started = time.perf_counter()
    machine = machine_info()
    repeats = args.repeats or (1 if args.quick else 5)
    command = "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {
        "machine": machine,
        "command": command.strip(),
        "quick": args.quick,
        "timing_repeats": repeats,
        "for_budget": for_budget_names(budgets or BUDGETS),
        "wall_s": 0.0,
        "tasks": [],
    }
    with tempfile.TemporaryDirectory(prefix="splitquant-bench-") as tmp:
        for task in build_tasks(args):
            result["tasks"].append(run_task(task, methods, Path(tmp), repeats, collect=not args.quick))
            result["wall_s"] = round(time.perf_counter() - started, 1)
            # after every task: a long run keeps what it did
            paths = write_all(result, Path(args.out or "benchmarks/results"), args.name or "quality", budgets)
            logger.info(
                "wrote %s (%d task(s), %.0f s)",
                ", ".join(str(p) for p in paths),
                len(result["tasks"]),
                result["wall_s"],
            )
    return 1 if any(r.get("error") for t in result["tasks"] for r in t["rows"]) else 0


def _restart_without_sinq_patch() -> None:
    """The SINQ wheel's ``sitecustomize.py`` patches transformers' loading and saving at interpreter start
    unless ``SINQ_AUTO_PATCH=0``; where it did (it sets ``SINQ_PTH_LOADED=1``), restart this script without it."""
    if os.environ.get("SINQ_PTH_LOADED") == "1":
        env = {k: v for k, v in os.environ.items() if k != "SINQ_PTH_LOADED"}
        env["SINQ_AUTO_PATCH"] = "0"
        logger.warning("SINQ patched transformers at start-up: restarting with SINQ_AUTO_PATCH=0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    _restart_without_sinq_patch()
    sys.exit(main())
