"""The package's modules import only downwards: errors < targets < config < algebra < quant, ir (the canonical
ops; its BatchNorm op reads quant's synchronized statistics) < capture, checks < patterns < passes, report <
export, compiling < api < the package itself < the application
(command line, training, demo, data, model specs, examples).

Each top-level module or sub-package of ``repq_fx`` has a rank below; an ``import`` or ``from ... import``
of ``repq_fx`` code (absolute or relative, at module level or inside a function) may name only a module
of the same or a lower rank. A new module must be given a rank here, which says where it belongs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "repq_fx"

RANKS = {
    "errors": 0, "targets": 1, "config": 2,
    "algebra": 3,
    "ir": 4, "quant": 4, "batches": 4,
    "capture": 5, "checks": 5,
    "patterns": 6,
    "passes": 7, "report": 7,
    "export": 8, "compiling": 8, "compiling_int8": 8,
    "api": 9,
    "__init__": 10,
    # the application: it uses the library, never the other way round
    "distributed": 11, "examples": 11, "models": 11, "data": 11, "train": 11, "bench": 11, "cases": 11,
    "demo": 12, "cli": 13, "__main__": 14,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> list[tuple[int, str]]:
    """``(line, repq_fx module)`` of every import of package code in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "repq_fx" or target.startswith("repq_fx."):
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "repq_fx"]
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_rank() -> None:
    assert {_top(_module_name(f)) for f in FILES} - RANKS.keys() == set()


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path: Path) -> None:
    own = _top(_module_name(path))
    upward = []
    for line, target in _imported(path):
        name = _top(target)
        if name not in RANKS:  # `from repq_fx import explain`: a name of the package's API
            name = "__init__"
        if name != own and RANKS[name] > RANKS[own]:
            upward.append(f"line {line}: {target} (rank {RANKS[name]} > {own}'s {RANKS[own]})")
    assert not upward, f"{path.relative_to(PACKAGE)} imports upwards: " + "; ".join(upward)
