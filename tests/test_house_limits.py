"""The library stays readable in pieces: no module over 400 lines, no function over 60 (docstring included).

The application (``repq_fx.app``: command line, training, demo, data) and the test fixtures
(``repq_fx.testing``) are outside this fence; tests/test_layering.py keeps them above the library.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "repq_fx"
OUTSIDE = {"app", "testing", "__main__.py"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60

LIBRARY = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in OUTSIDE)


def test_the_fence_holds_the_library() -> None:
    assert len(LIBRARY) > 40 and PACKAGE / "api.py" in LIBRARY


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_modules_and_functions_are_short(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split it by idea"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: {', '.join(long)}"
