"""House rules the package keeps by size: no Python file over 400 lines, no function over 60 lines.

A function's length runs from its ``def`` line (decorators not counted) to its last line, docstring
and comments included (``end_lineno - lineno + 1``); methods and nested functions count on their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "optimum_splitquant"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def oversized(root: Path) -> list[str]:
    """Every Python file under ``root`` over :data:`MAX_FILE_LINES` lines and every function over
    :data:`MAX_FUNCTION_LINES`, as ``path: N lines`` and ``path:line name(): N lines`` (paths relative to ``root``)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(root).as_posix()
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            found.append(f"{name}: {lines} lines")
        functions = [
            node
            for node in ast.walk(ast.parse(text, filename=str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        for node in sorted(functions, key=lambda node: node.lineno):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    return found


def test_no_file_or_function_of_the_package_is_oversized():
    found = oversized(PACKAGE)
    assert not found, (
        f"split by concept (files over {MAX_FILE_LINES} lines, functions over {MAX_FUNCTION_LINES}):\n  "
        + "\n  ".join(found)
    )


def _function(name: str, lines: int, indent: str = "") -> str:
    """A function of exactly ``lines`` lines."""
    body = [f"{indent}    x = {i}" for i in range(lines - 2)]
    return "\n".join([f"{indent}def {name}():", *body, f"{indent}    return x"]) + "\n"


def test_the_check_names_what_is_over_the_limits_and_nothing_at_them(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "ok.py").write_text(_function("at_limit", 60) + "\n" * (400 - 60), encoding="utf-8")
    (tmp_path / "pkg" / "long.py").write_text("x = 1\n" * 401, encoding="utf-8")
    method = "class A:\n" + _function("method", 61, indent="    ")
    nested = "def outer():\n" + _function("inner", 61, indent="    ") + "    return inner\n"
    (tmp_path / "pkg" / "funcs.py").write_text(method + "\n\n" + nested, encoding="utf-8")
    assert len((tmp_path / "pkg" / "ok.py").read_text().splitlines()) == 400
    assert oversized(tmp_path) == [
        "pkg/funcs.py:2 method(): 61 lines",
        "pkg/funcs.py:65 outer(): 63 lines",
        "pkg/funcs.py:66 inner(): 61 lines",
        "pkg/long.py: 401 lines",
    ]
