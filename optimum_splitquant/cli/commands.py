"""``optimum-splitquant``: quantize a model into a SplitQuant folder (and push it), evaluate it, or run the demo.

::

    optimum-splitquant                                   # the demo: a real spam classifier at 2 bits
    optimum-splitquant quantize MODEL --budget 4.5 --output DIR [--overwrite] [--push-to-hub REPO_ID] [--evaluate]
    optimum-splitquant quantize MODEL --bits 2 --output DIR [--num-clusters 3] [--group-size 64] ...
    optimum-splitquant evaluate DIR [--base MODEL]

``quantize`` takes exactly one of ``--budget`` and ``--bits`` (argparse names both when neither or
both are given). ``--budget B`` starts from ``SplitQuantConfig.for_budget(B)``, the best measured
configuration within ``B`` stored bits per weight; the other settings given (``--num-clusters``,
``--group-size``, ``--clustering``, ``--fit``, ``--range-bits``, ``--range-block``, ``--column-scales``) override its
fields, and the result must still fit in ``B``. ``--bits N`` takes those settings as given, and
``SplitQuantConfig``'s defaults for the others.

The same commands run as ``optimum-cli splitquant ...`` (registered by
``optimum/commands/register/register_splitquant.py``, which hands its arguments to :func:`main`).

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


def _add_quantize(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """The ``quantize`` command's arguments: the size (``--budget`` or ``--bits``), settings, output, Hub, evaluation."""
    q = sub.add_parser("quantize", parents=[common], help="quantize a model into a SplitQuant folder")
    q.add_argument("model", help="local model folder or Hub id")
    size = q.add_mutually_exclusive_group(required=True)
    size.add_argument(
        "--budget",
        type=float,
        metavar="BITS_PER_WEIGHT",
        help="stored bits per weight to fit in (e.g. 4.5): the best measured configuration within it "
        "(SplitQuantConfig.for_budget); the settings below, if given, override its fields",
    )
    size.add_argument("--bits", type=int, metavar="N", help="code bits per weight: 2 to 8, with the settings below")
    settings = q.add_argument_group(
        "settings",
        "With --bits, a setting not given takes the default shown. With --budget, a setting given overrides "
        "the budget's configuration, which must still fit in the budget.",
    )
    settings.add_argument("--num-clusters", type=int, help="k-means clusters per layer (1 = plain min-max; default 3)")
    settings.add_argument("--group-size", type=int, help="input columns per range (default: the whole row)")
    settings.add_argument(
        "--clustering", help="tensor (one k-means per layer) or channel (one per row); default tensor"
    )
    settings.add_argument(
        "--fit", help="range of each cluster: minmax (the paper) or mse (least squares); default minmax"
    )
    settings.add_argument(
        "--range-bits", type=int, help="store each scale and offset as a code of 4-8 bits (needs --fit mse)"
    )
    settings.add_argument(
        "--range-block",
        type=int,
        help="(row, group) lines sharing one step of the coded ranges (with --range-bits; default 8)",
    )
    settings.add_argument(
        "--column-scales",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store a scale per input column, used where it lowers the error (format 4; default off)",
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


def _parser(prog: str = "optimum-splitquant") -> argparse.ArgumentParser:
    """The command line: ``quantize``, ``evaluate`` and ``demo`` (the default), named ``prog`` in messages."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logs, tracebacks"
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description="SplitQuant (arXiv 2501.12428) low-bit weight quantization for transformers models. "
        "With no command: build (once) a real SMS spam classifier and compare it at 2 bits.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="{quantize,evaluate,demo}")

    _add_quantize(sub, common)

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


def main(argv: list[str] | None = None, prog: str = "optimum-splitquant") -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    ``prog`` names the command in usage and ``error:`` lines (``optimum-cli splitquant`` runs it too).
    """
    args = _parser(prog).parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with _logging(verbose):
            func: Any = getattr(args, "func", cmd_demo)
            return func(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as exc:
        if verbose:
            raise
        hint = "" if isinstance(exc, CliError) else f" ({type(exc).__name__}; --verbose shows the traceback)"
        sys.stderr.write(f"{prog}: error: {one_line(exc)}{hint}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
