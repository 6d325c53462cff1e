"""What the user sees of a command: its results on stdout, and one ``error:`` line for a failure."""

from __future__ import annotations

import sys

__all__ = ["CliError", "one_line", "out"]


class CliError(Exception):
    """A failure the user can act on; its message is printed as the single ``error:`` line."""


def out(text: str = "") -> None:
    """User-facing output (stdout)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line of at most 300 characters (its type name if it has none)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
