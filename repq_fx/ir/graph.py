"""Small GraphModule helpers shared by every stage: attribute lookup, free names, inserting a call in
place of a node, parameter dtype, sizes, hooks.

>>> import torch.nn as nn, torch.fx as fx
>>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 1, 1)))
>>> fetch_attr(gm, "0.weight").shape, free_module_path(gm, "0.weight"), param_dtype(gm)
(torch.Size([1, 1, 1, 1]), '0.weight_1', torch.float32)
"""
from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.const_fold import get_unique_attr_name_in_module


def finish_pass(gm: fx.GraphModule, unused_submodules: bool = True) -> fx.GraphModule:
    """The end of a graph pass: dead nodes (and, by default, the submodules no node calls) removed, the graph
    checked, the code regenerated.

    >>> import torch.nn as nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    >>> _ = gm.graph.call_function(len, (gm.graph.placeholder("unused"),))  # dead: nothing reads it
    >>> len(finish_pass(gm).graph.nodes)   # input, relu, output, and the new placeholder
    4
    """
    gm.graph.eliminate_dead_code()
    if unused_submodules:
        gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    """The object at a dotted ``get_attr`` target (a tensor or a module)."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def attributes_read(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """The ``get_attr`` nodes that ``nodes`` are computed from (transitively), in the order found.

    >>> gm = fx.symbolic_trace(torch.nn.Linear(2, 3))
    >>> out = [n for n in gm.graph.nodes if n.op == "call_function"]
    >>> [n.target for n in attributes_read(out)]
    ['weight', 'bias']
    """
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            if arg.op == "get_attr":
                found.append(arg)
            else:
                stack.append(arg)
    return found


def input_dependent(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose value depends on a graph input (the rest compute from parameters and constants).

    >>> gm = fx.symbolic_trace(nn.Linear(2, 3))
    >>> sorted(n.name for n in input_dependent(gm.graph))
    ['input_1', 'linear', 'output']
    """
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def free_module_path(root: nn.Module, target: str) -> str:
    """``target``, or ``target_1``, ``target_2``... whichever is not taken yet (a dotted path: the last
    name is made free in the module it names; torch.fx's own helper picks the suffix).

    >>> free_module_path(nn.Sequential(nn.ReLU()), "reparam_conv"), free_module_path(nn.Linear(1, 1), "bias")
    ('reparam_conv', 'bias_1')
    """
    prefix, _, name = target.rpartition(".")
    try:
        owner = fetch_attr(root, prefix) if prefix else root
    except AttributeError:
        return target  # the module it would go under does not exist yet: nothing there is taken
    if not hasattr(owner, name):
        return target
    free = get_unique_attr_name_in_module(owner, name)  # type: ignore[arg-type]  # uses hasattr only
    return f"{prefix}.{free}" if prefix else free


def insert_call(node: fx.Node, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """A ``call_function`` of ``target`` inserted before ``node``, with ``node``'s metadata (shapes, stack).

    >>> gm = fx.symbolic_trace(torch.nn.ReLU())
    >>> relu = next(n for n in gm.graph.nodes if n.op == "call_function")
    >>> insert_call(relu, torch.tanh, relu.args).meta is not relu.meta
    True
    """
    with node.graph.inserting_before(node):
        new = node.graph.call_function(target, args, kwargs)
    new.meta = dict(node.meta)
    return new


HOOK_KINDS = ("forward", "forward pre", "backward", "backward pre")


def hook_kinds(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on ``module`` itself (:data:`HOOK_KINDS`), in that order.

    >>> m = nn.ReLU()
    >>> _ = m.register_forward_hook(lambda *a: None)
    >>> hook_kinds(m)
    ['forward']
    """
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    return [kind for kind, registered in zip(HOOK_KINDS, hooks) if registered]


def param_dtype(gm: torch.nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter (the default dtype if there is none)."""
    for p in gm.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


_SIZE_METHODS = frozenset({"size", "dim", "numel", "nelement", "stride"})
_SIZE_ATTRIBUTES = frozenset({"shape", "ndim"})
# what turns sizes into sizes: integer arithmetic, indexing a shape, builtins on numbers
_SIZE_ARITHMETIC = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.getitem, builtins.int, builtins.float, builtins.min, builtins.max, builtins.len,
    builtins.abs, builtins.round, math.ceil, math.floor, math.sqrt,
})
_SIZE_FUNCTIONS: set[Any] = set()  # functions a front end names its size arithmetic with


def size_function(fn: Any) -> Any:
    """Mark ``fn`` as size arithmetic (its result is a size, see :func:`is_size_value`); a decorator.

    >>> @size_function
    ... def size_twice(a):
    ...     return 2 * a
    """
    _SIZE_FUNCTIONS.add(fn)
    return fn


def is_size_value(node: Any) -> bool:
    """True for a node whose value is a size (a number or a shape), not a tensor: ``x.size(3)``,
    ``x.shape[2] // 2``, ``x.dim()``; export's ``sym_size`` and SymInt arithmetic too.

    >>> gm = fx.symbolic_trace(lambda x: torch.nn.functional.avg_pool2d(x, x.size(3) // 2))
    >>> [n.name for n in gm.graph.nodes if is_size_value(n)]
    ['size', 'floordiv']
    """
    if not isinstance(node, fx.Node):
        return False
    val = node.meta.get("val")
    if isinstance(val, (torch.SymInt, torch.SymFloat)) or (isinstance(val, (int, float)) and not isinstance(val, bool)):
        return True
    if node.op == "call_method":
        return node.target in _SIZE_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return node.args[1] in _SIZE_ATTRIBUTES
    if node.target is torch.ops.aten.sym_size.int:
        return True
    try:
        arithmetic = node.target in _SIZE_ARITHMETIC or node.target in _SIZE_FUNCTIONS
    except TypeError:  # an unhashable target
        return False
    inputs = node.all_input_nodes
    return arithmetic and bool(inputs) and all(is_size_value(i) for i in inputs)
