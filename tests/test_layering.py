"""The package's modules import only downwards: errors < targets < config < algebra < quant, ir (the canonical
ops; its BatchNorm op reads quant's synchronized statistics) < capture, checks < patterns < passes, report <
export, compiling < api < the package itself (the library) < repq_fx.testing (reference blocks and cases) <
repq_fx.app (the application: data, model specs, example networks, training, demo, command line) <
``python -m repq_fx``.

Each top-level module or sub-package of ``repq_fx`` has a rank below (inside ``repq_fx.app``, each of its
modules or sub-packages); an ``import`` or ``from ... import`` of ``repq_fx`` code (absolute or relative,
at module level or inside a function) may name only a module of the same or a lower rank. A new module
must be given a rank here, which says where it belongs.
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
    # above the library: reference blocks and cases for tests
    "testing": 11,
    # the application: it uses the library, never the other way round
    "app": 12, "app.distributed": 12, "app.networks": 12, "app.models": 12, "app.data": 12, "app.train": 12,
    "app.bench": 12,
    "app.demo": 13, "app.cli": 14,
    "__main__": 15,
}
LIBRARY_TOP = RANKS["__init__"]  # ranks up to this one are the library
ABOVE_THE_LIBRARY = ("repq_fx.app", "repq_fx.testing")


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
    """The unit ``module`` belongs to: a top-level module or sub-package, or one of ``repq_fx.app``'s."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "app":
        return f"app.{parts[2]}"
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


def _is_library(path: Path) -> bool:
    return RANKS[_top(_module_name(path))] <= LIBRARY_TOP


def test_the_library_is_below_the_application_and_testing() -> None:
    assert min(r for name, r in RANKS.items() if name.startswith("app")) > RANKS["testing"] > LIBRARY_TOP


@pytest.mark.parametrize("path", [f for f in FILES if _is_library(f)], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_library_never_imports_the_application(path: Path) -> None:
    found = [f"line {line}: {target}" for line, target in _imported(path)
             if any(target == top or target.startswith(top + ".") for top in ABOVE_THE_LIBRARY)]
    assert not found, f"{path.relative_to(PACKAGE)} (library) imports repq_fx.app or repq_fx.testing: " + "; ".join(found)
