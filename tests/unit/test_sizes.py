"""Rooms stay small enough to read: no class over 300 lines, no function over 60, counted with :mod:`ast`.

A body is counted from its first statement after the docstring to its last
line, comments and blank lines inside included. Checked for every module of
the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import exactlyonce

MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60
PACKAGE_DIR = Path(exactlyonce.__file__).parent


def body_lines(node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The lines of ``node``'s body, its docstring left out."""
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:]
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def oversized(source: str, name: str) -> list[str]:
    """Each class and function (methods and nested ones included) of ``source`` over its limit."""
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.ClassDef):
            limit = MAX_CLASS_LINES
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            limit = MAX_FUNCTION_LINES
        else:
            continue
        if (lines := body_lines(node)) > limit:
            found.append(f"{name}:{node.lineno} {node.name}: {lines} lines (at most {limit})")
    return found


def test_no_class_or_function_of_the_package_is_too_long() -> None:
    """Every module: classes within 300 lines, functions within 60."""
    modules = sorted(PACKAGE_DIR.rglob("*.py"))
    assert len(modules) > 40, "the walk sees the whole package"
    found = [problem for path in modules for problem in oversized(path.read_text(encoding="utf-8"), str(path))]
    assert not found, "too long:\n" + "\n".join(found)


def _function(lines: int) -> str:
    return 'def f():\n    """Doc.\n\n    More.\n    """\n' + "    x = 1\n" * lines


def test_the_count_leaves_the_docstring_out_and_reports_one_line_over() -> None:
    """60 body lines under a 4-line docstring pass; 61 do not; a method counts inside its class too."""
    assert oversized(_function(60), "m.py") == []
    assert oversized(_function(61), "m.py") == ["m.py:1 f: 61 lines (at most 60)"]
    method = "class C:\n" + "\n".join("    " + line for line in _function(61).splitlines()) + "\n"
    assert oversized(method, "m.py") == ["m.py:2 f: 61 lines (at most 60)"]
    big_class = "class C:\n" + "    x = 1\n" * 301
    assert oversized(big_class, "m.py") == ["m.py:1 C: 301 lines (at most 300)"]
