"""Size arithmetic in a torch.export graph: its own function names, and sizes read from the inputs.

Export records size arithmetic as ``operator.add`` etc. on SymInts. The canonical graph keeps those
targets for tensor arithmetic only, so size arithmetic gets names of its own (marked with
:func:`repq_fx.ir.size_function`).

>>> size_floordiv(7, 2), is_concrete(3), same_size(3, 3)
(3, True, True)
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ..ir import size_function

aten = torch.ops.aten


@size_function
def size_add(a: Any, b: Any) -> Any:
    return a + b


@size_function
def size_sub(a: Any, b: Any) -> Any:
    return a - b


@size_function
def size_mul(a: Any, b: Any) -> Any:
    return a * b


@size_function
def size_floordiv(a: Any, b: Any) -> Any:
    return a // b


@size_function
def size_truediv(a: Any, b: Any) -> Any:
    return a / b


@size_function
def size_mod(a: Any, b: Any) -> Any:
    return a % b


@size_function
def size_neg(a: Any) -> Any:
    return -a


_SIZE_OPS = {operator.add: size_add, operator.sub: size_sub, operator.mul: size_mul,
             operator.floordiv: size_floordiv, operator.truediv: size_truediv, operator.mod: size_mod,
             operator.neg: size_neg}

def is_concrete(s: Any) -> bool:
    return isinstance(s, int) or (isinstance(s, torch.SymInt) and s.node.expr.is_number)


def same_size(a: Any, b: Any) -> bool:
    if is_concrete(a) and is_concrete(b):
        return int(a) == int(b)
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return False


def rename_size_arithmetic(graph: fx.Graph) -> None:
    """Size arithmetic gets its own function names; sizes of intermediates are read from the inputs."""
    by_symbol: dict[Any, tuple[fx.Node, int]] = {}
    for ph in (n for n in graph.nodes if n.op == "placeholder"):
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor):
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                    by_symbol.setdefault(s.node.expr, (ph, d))
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _SIZE_OPS and isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, int, float)) \
                and not isinstance(node.meta.get("val"), bool):
            node.target = _SIZE_OPS[node.target]
        elif node.target is aten.sym_size.int and node.args[0].op != "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.SymInt) and val.node.expr in by_symbol:
                node.args = by_symbol[val.node.expr]
