"""``optimum-cli splitquant``: the ``optimum-splitquant`` commands as an optimum-cli subcommand.

optimum-cli (optimum 2.x) imports every module of the ``optimum.commands.register`` namespace package
at start-up and registers the commands listed in its ``REGISTER_COMMANDS``. This module is our
distribution's portion of that namespace (``optimum/commands/register/`` holds no ``__init__.py``,
per PEP 420): ``pip install`` (also ``-e``) makes it importable, and uninstalling removes it.

Every ``optimum-cli`` call imports it, so it imports nothing of ours (``optimum_splitquant`` pulls
torch and transformers). ``splitquant`` takes the rest of the command line as it is and hands it to
:func:`optimum_splitquant.cli.commands.main`: one parser and one set of handlers for both programs.
"""

from __future__ import annotations

import argparse

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

__all__ = ["REGISTER_COMMANDS", "SplitQuantCommand"]

PROG = "optimum-cli splitquant"

# What `optimum-cli splitquant --help` shows; the commands are those of optimum_splitquant.cli.commands
# (tests/cli/test_optimum_cli.py checks that the two lists agree).
COMMANDS = (
    ("quantize", "quantize a model into a SplitQuant folder (--budget BITS or --bits N)"),
    ("evaluate", "score a model on offline real data"),
    ("demo", "a real SMS spam classifier, FP32 vs plain INT2 vs SplitQuant INT2"),
)
_DESCRIPTION = "\n".join(
    [
        "SplitQuant (arXiv 2501.12428) low-bit weight quantization, from optimum-splitquant: the commands",
        "and options of `optimum-splitquant`.",
        "",
        "commands:",
        *(f"  {name:<10}{text}" for name, text in COMMANDS),
        "",
        f"`{PROG} COMMAND --help` lists a command's options, e.g.",
        f"  {PROG} quantize MODEL --budget 4.5 --output DIR",
    ]
)


class SplitQuantCommand(BaseOptimumCLICommand):
    """``optimum-cli splitquant COMMAND ...``: runs ``optimum-splitquant COMMAND ...``."""

    COMMAND = CommandInfo(name="splitquant", help="SplitQuant low-bit weight quantization")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.description = _DESCRIPTION
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.add_argument(
            "arguments",
            nargs=argparse.REMAINDER,
            metavar="COMMAND ...",
            help="an optimum-splitquant command (quantize, evaluate, demo) and its arguments",
        )

    def run(self) -> None:
        """Run the command given (exit status as ``optimum-splitquant``'s); none given shows the help."""
        if not self.args.arguments:
            self.parser.print_help()
            return
        from optimum_splitquant.cli.commands import main

        raise SystemExit(main(list(self.args.arguments), prog=PROG))


REGISTER_COMMANDS = [SplitQuantCommand]
