"""One rule-table engine for every registry of the package: rules keyed by what a node calls.

A :class:`RuleTable` maps four kinds of keys to rules, told apart by their type:

- a module class (``nn.Conv2d``): matches ``call_module`` nodes of that class or a subclass;
- a method name (``"add_"``): matches ``call_method`` nodes;
- a function (``F.conv2d``, ``operator.add``): matches ``call_function`` nodes;
- an ATen op (``torch.ops.aten.conv2d``, the packet: every overload; or one overload
  ``aten.mean.dim``): matches ``call_function`` nodes of a torch.export graph.

``register(*keys)`` is the one way in (a decorator), ``lookup(node, root)`` the one way out.
A rewrite rule (canonicalize, the export front end) returns the value that replaces the node,
or one of two sentinels: :data:`KEEP` (leave the node as it is) or :data:`ERASED` (the rule
removed the node itself); :func:`apply` does what the answer says.

>>> import torch, torch.fx as fx, torch.nn.functional as F
>>> table = RuleTable("example")
>>> @table.register(F.relu, "relu")
... def _relu(node):
...     return node.args[0]
>>> gm = fx.symbolic_trace(lambda x: F.relu(x).relu())
>>> [table.lookup(n) is _relu for n in gm.graph.nodes]
[False, True, True, False]
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import RegistrationError

R = TypeVar("R")


class Sentinel:
    """A named answer of a rewrite rule that is not a value (see :data:`KEEP`, :data:`ERASED`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


KEEP = Sentinel("KEEP")  # the rule does not apply: the node stays as it is
ERASED = Sentinel("ERASED")  # the rule removed the node (and rewired its users) itself


class RuleTable(Generic[R]):
    """Rules keyed by module class, method name, function or ATen op (see the module docstring)."""

    def __init__(self, what: str) -> None:
        self.what = what  # what a rule of this table is, for messages
        self._modules: dict[type, R] = {}
        self._methods: dict[str, R] = {}
        self._functions: dict[Any, R] = {}

    def register(self, *keys: Any) -> Callable[[R], R]:
        """Register the decorated rule for every key in ``keys`` (a later registration replaces an earlier one).

        >>> RuleTable("example").register(3)(print)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        repq_fx.errors.RegistrationError: an example is registered for a module class, ... got 3 (int)
        """
        tables = [self._table_for(k) for k in keys]

        def deco(rule: R) -> R:
            for key, table in zip(keys, tables):
                table[key] = rule
            return rule
        return deco

    def _table_for(self, key: Any) -> dict:
        if isinstance(key, str):
            return self._methods
        if isinstance(key, type) and issubclass(key, nn.Module):
            return self._modules
        if callable(key) and not isinstance(key, type):
            return self._functions
        raise RegistrationError(f"an {self.what} is registered for a module class, a method name, a function or an "
                                f"ATen op; got {key!r} ({type(key).__name__})")

    def lookup(self, node: fx.Node, root: nn.Module | None = None) -> R | None:
        """The rule for what ``node`` calls (None if there is none); ``root`` resolves ``call_module`` targets."""
        if node.op == "call_module":
            if root is None:
                return None
            return self.for_module(root.get_submodule(node.target))
        if node.op == "call_method":
            return self._methods.get(node.target)
        if node.op == "call_function":
            return self.for_function(node.target)
        return None

    def for_module(self, module: nn.Module) -> R | None:
        """The rule of the nearest registered class in ``type(module)``'s MRO."""
        return next((self._modules[c] for c in type(module).__mro__ if c in self._modules), None)

    def for_function(self, target: Any) -> R | None:
        """The rule of a function, or of an ATen overload (registered as itself or as its packet)."""
        try:
            rule = self._functions.get(target)
        except TypeError:  # an unhashable target
            return None
        if rule is None and isinstance(target, torch._ops.OpOverload):
            rule = self._functions.get(target.overloadpacket)
        return rule

    def functions(self) -> dict[Any, R]:
        """The function-keyed rules, as a dict (e.g. for ``torch.onnx``'s ``custom_translation_table``)."""
        return dict(self._functions)


def apply(node: fx.Node, result: Any) -> bool:
    """Carry out a rewrite rule's answer for ``node``: replace it by ``result`` (True), or nothing for
    :data:`KEEP`, :data:`ERASED` or the node itself (False).

    >>> gm = fx.symbolic_trace(lambda x: x.relu())
    >>> relu = list(gm.graph.nodes)[1]
    >>> apply(relu, KEEP), apply(relu, relu.args[0]), [n.op for n in gm.graph.nodes]
    (False, True, ['placeholder', 'output'])
    """
    if result is KEEP or result is ERASED or result is node:
        return False
    node.replace_all_uses_with(result)
    node.graph.erase_node(node)
    return True


__all__ = ["RuleTable", "Sentinel", "KEEP", "ERASED", "apply"]
