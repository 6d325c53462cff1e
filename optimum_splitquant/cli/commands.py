"""``optimum-splitquant``: quantize a model into a SplitQuant folder (and push it), evaluate it, or run the demo.

::

    optimum-splitquant                                   # the demo: a real spam classifier at 2 bits
    optimum-splitquant quantize MODEL --bits 2 --output DIR [--overwrite] [--push-to-hub REPO_ID] [--evaluate]
    optimum-splitquant evaluate DIR [--base MODEL]

Results go to stdout; progress and diagnostics to stderr. A failure ends with one ``error:`` line
on stderr and exit status 1 (2 for a malformed command line); ``--verbose`` shows the traceback.

This module is the command line itself (parser, logging, entry point); the commands live in
:mod:`.quantize`, :mod:`.evaluate` and :mod:`.demo`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import transformers

from . import demo
from .console import CliError, one_line, out
from .evaluate import cmd_evaluate
from .models import TASKS
from .quantize import cmd_quantize

__all__ = ["CliError", "cmd_demo", "main"]


def cmd_demo(args: argparse.Namespace) -> int:
    """The default job: a real MiniLM spam classifier, FP32 vs plain INT2 vs SplitQuant INT2."""
    result = demo.run(fresh=getattr(args, "fresh", False), rebuild=getattr(args, "rebuild", False))
    out(demo.format_report(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    """The command line: ``quantize``, ``evaluate`` and ``demo`` (the default)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logs, tracebacks"
    )
    parser = argparse.ArgumentParser(
        prog="optimum-splitquant",
        description="SplitQuant (arXiv 2501.12428) low-bit weight quantization for transformers models. "
        "With no command: build (once) a real SMS spam classifier and compare it at 2 bits.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="{quantize,evaluate,demo}")

    q = sub.add_parser("quantize", parents=[common], help="quantize a model into a SplitQuant folder")
    q.add_argument("model", help="local model folder or Hub id")
    q.add_argument("--bits", type=int, required=True, help="code bits per weight: 2 to 8")
    q.add_argument("--num-clusters", type=int, default=3, help="k-means clusters per layer (1 = plain min-max)")
    q.add_argument("--group-size", type=int, default=None, help="input columns per range (default: whole row)")
    q.add_argument("--clustering", default="tensor", help="tensor (one k-means per layer) or channel (per row)")
    q.add_argument("--fit", default="minmax", help="range of each cluster: minmax (the paper) or mse (least squares)")
    q.add_argument(
        "--range-bits",
        type=int,
        default=None,
        help="store each scale and offset as a code of 4-8 bits (needs --fit mse)",
    )
    q.add_argument("--task", choices=TASKS, default="auto", help="model head to load (default: from config)")
    q.add_argument("--output", required=True, help="folder to write the quantized model to (new or empty)")
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output folder holding an earlier saved model (swapped in whole when done)",
    )
    q.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub repository")
    q.add_argument("--private", action="store_true", help="create the Hub repository as private")
    q.add_argument("--base-model", help="Hub id of the float model, for the model card")
    q.add_argument("--evaluate", action="store_true", help="score it against the float model; results go in the card")
    q.add_argument("--limit", type=int, help="evaluation size (texts, messages or tokens)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("evaluate", parents=[common], help="score a model on offline real data")
    e.add_argument("model", help="saved model folder (SplitQuant or float) or Hub id")
    e.add_argument("--task", choices=TASKS, default="auto")
    e.add_argument("--base", help="float model to compare with (default: the card's base_model, if available)")
    e.add_argument("--tokenizer", help="tokenizer folder if the model folder has none")
    e.add_argument("--limit", type=int, help="evaluation size (texts, messages or tokens)")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", parents=[common], help="the default job (same as no command)")
    d.add_argument("--fresh", action="store_true", help="quantize the cached classifier again")
    d.add_argument("--rebuild", action="store_true", help="also rebuild the cached FP32 classifier")
    d.set_defaults(func=cmd_demo)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (robust to redirection)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Show the package's INFO logs (DEBUG with ``verbose``) on stderr while the command runs."""
    handler = _StderrHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s")
    )
    pkg = logging.getLogger("optimum_splitquant")
    saved = (pkg.level, pkg.propagate)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    pkg.addHandler(handler)
    pkg.setLevel(logging.DEBUG if verbose else logging.INFO)
    pkg.propagate = False
    if not verbose:
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(saved[0])
        pkg.propagate = saved[1]
        if bars:
            transformers.utils.logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with _logging(verbose):
            func: Any = getattr(args, "func", cmd_demo)
            return func(args)
    except KeyboardInterrupt:
        sys.stderr.write("optimum-splitquant: interrupted\n")
        return 130
    except Exception as exc:
        if verbose:
            raise
        hint = "" if isinstance(exc, CliError) else f" ({type(exc).__name__}; --verbose shows the traceback)"
        sys.stderr.write(f"optimum-splitquant: error: {one_line(exc)}{hint}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
