"""The package's modules and functions stay short enough to read in one sitting: no module over
MAX_MODULE_LINES lines, no function (method, nested function) over MAX_FUNCTION_LINES lines, counted
from its ``def`` to its last line, docstring included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "unet_trainer"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def module_lines() -> dict[str, int]:
    return {
        str(p.relative_to(ROOT.parent)): len(p.read_text(encoding="utf-8").splitlines()) for p in ROOT.rglob("*.py")
    }


def function_lines(source: str, name: str) -> dict[str, int]:
    """``{"module.py:function@line": lines}`` for every function and method in ``source``."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[f"{name}:{node.name}@{node.lineno}"] = node.end_lineno - node.lineno + 1
    return found


def all_function_lines() -> dict[str, int]:
    found = {}
    for path in ROOT.rglob("*.py"):
        found.update(function_lines(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT.parent))))
    return found


def test_no_module_is_longer_than_the_limit():
    sizes = module_lines()
    assert len(sizes) > 30  # the walk sees the package
    long = {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_longer_than_the_limit():
    sizes = all_function_lines()
    assert len(sizes) > 300  # the walk sees the functions
    long = {f: n for f, n in sizes.items() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_counter_counts_a_function_from_def_to_its_last_line():
    source = "def f():\n    '''doc'''\n    x = 1\n\n    return x\n\n\nclass C:\n    def g(self):\n        pass\n"
    assert function_lines(source, "m.py") == {"m.py:f@1": 5, "m.py:g@9": 2}
