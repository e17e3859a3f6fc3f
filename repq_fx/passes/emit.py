"""Run tensor code once, recording it as FX nodes: how ``prepare`` emits the merged-weight function.

A :class:`Sym` pairs an FX node with the value that node has now (eval-mode
parameters). Any torch function, tensor method or arithmetic operator applied to
Syms computes the value *and* appends the call to the graph, so the algebra in
``repq_fx.algebra`` (plain torch code) is emitted as nodes without a second
implementation. Real tensors that meet a Sym (identity kernels, masks) become
non-persistent buffers of the GraphModule. A function may be recorded as another one that
computes the same values (``recorded_as``: ``prepare`` records the algebra's ``embed_add`` as the
training kernel ``quant.embed_add.embed_add``). The algebra takes its value-dependent decisions
on a Sym's current value (registered with ``algebra.decisions.register_concrete``).

>>> import torch, torch.fx as fx
>>> gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
>>> em = Emitter(gm)
>>> w = em.wrap(gm.graph.placeholder("w"), torch.ones(2, 2))
>>> y = (w * 3).sum(dim=0)
>>> y.value.tolist(), [n.op for n in gm.graph.nodes]
([6.0, 6.0], ['placeholder', 'call_function', 'call_method'])
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from ..algebra.decisions import register_concrete


class Sym:
    """A value with the FX node that computes it."""

    __slots__ = ("node", "value", "emitter")

    def __init__(self, node: fx.Node, value: Any, emitter: "Emitter") -> None:
        self.node, self.value, self.emitter = node, value, emitter

    # tensor metadata comes from the value
    @property
    def shape(self) -> torch.Size:
        return self.value.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.value.dtype

    @property
    def device(self) -> torch.device:
        return self.value.device

    @property
    def ndim(self) -> int:
        return self.value.ndim

    def dim(self) -> int:
        return self.value.dim()

    def numel(self) -> int:
        return self.value.numel()

    def size(self, *args: Any) -> Any:
        return self.value.size(*args)

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        emitter = next(a.emitter for a in _flat(args, kwargs) if isinstance(a, Sym))
        return emitter.call(func, args, kwargs or {})

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)
        if not callable(getattr(torch.Tensor, name, None)):
            raise AttributeError(f"Sym has no attribute {name!r}")
        return lambda *args, **kwargs: self.emitter.call_method(name, self, args, kwargs)

    def __getitem__(self, index: Any) -> "Sym":
        return self.emitter.call(operator.getitem, (self, index), {})

    def __repr__(self) -> str:
        return f"Sym({self.node.name}, shape={tuple(self.value.shape)})"


def _binary(op: Callable[[Any, Any], Any], reflected: bool = False) -> Callable[[Sym, Any], Sym]:
    def method(self: Sym, other: Any) -> Sym:
        args = (other, self) if reflected else (self, other)
        return self.emitter.call(op, args, {})
    return method


for _name, _op in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("pow", operator.pow)):
    setattr(Sym, f"__{_name}__", _binary(_op))
    setattr(Sym, f"__r{_name}__", _binary(_op, reflected=True))
Sym.__neg__ = lambda self: self.emitter.call(operator.neg, (self,), {})  # type: ignore[attr-defined]


def _flat(args: Any, kwargs: Any) -> list[Any]:
    out: list[Any] = []
    tree_map(out.append, (args, kwargs or {}))
    return out


class Emitter:
    """Appends recorded calls to ``gm.graph`` at the current insertion point."""

    def __init__(self, gm: fx.GraphModule, prefix: str = "_repq_const",
                 recorded_as: Mapping[Callable, Callable] | None = None) -> None:
        self.gm, self.graph, self.prefix = gm, gm.graph, prefix
        self.recorded_as = dict(recorded_as or {})  # function -> the function its graph node calls
        self._constants: dict[int, tuple[torch.Tensor, fx.Node]] = {}  # id -> (tensor kept alive, node)

    def wrap(self, node: fx.Node, value: Any) -> Sym:
        """An existing node with its current value."""
        return Sym(node, value, self)

    def constant(self, t: torch.Tensor) -> fx.Node:
        """A tensor constant as a non-persistent buffer of the module (so it follows ``.to()``)."""
        key = id(t)  # the cache holds t, so its id cannot be reused by another tensor
        if key not in self._constants:
            i = 0
            while hasattr(self.gm, f"{self.prefix}{i}"):
                i += 1
            name = f"{self.prefix}{i}"
            self.gm.register_buffer(name, t.detach().clone(), persistent=False)
            self._constants[key] = (t, self.graph.get_attr(name))
        return self._constants[key][1]

    def _to_node(self, a: Any) -> Any:
        if isinstance(a, Sym):
            return a.node
        if isinstance(a, torch.Tensor):
            return self.constant(a)
        return a

    def call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        value = func(*tree_map(_value, args), **tree_map(_value, kwargs))
        name = getattr(func, "__name__", "")
        if args and getattr(torch.Tensor, name, None) is func:
            # a tensor method reached through __torch_function__ (e.g. real_tensor * sym): recorded as a
            # method call, since `torch.Tensor.mul` as a function target has no importable name
            node = self.graph.call_method(name, tree_map(self._to_node, tuple(args)), tree_map(self._to_node, kwargs))
        else:
            node = self.graph.call_function(self.recorded_as.get(func, func), tree_map(self._to_node, args),
                                            tree_map(self._to_node, kwargs))
        return self._wrap_result(node, value)

    def call_method(self, name: str, self_arg: Sym, args: tuple, kwargs: dict) -> Any:
        value = getattr(self_arg.value, name)(*tree_map(_value, args), **tree_map(_value, kwargs))
        node = self.graph.call_method(name, (self_arg.node, *tree_map(self._to_node, args)),
                                      tree_map(self._to_node, kwargs))
        return self._wrap_result(node, value)

    def _wrap_result(self, node: fx.Node, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return Sym(node, value, self)
        if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
            return type(value)(Sym(self.graph.call_function(operator.getitem, (node, i)), v, self)
                               for i, v in enumerate(value))
        return value


def _value(a: Any) -> Any:
    return a.value if isinstance(a, Sym) else a


def node_of(a: Any) -> Any:
    """The node of a Sym (other values unchanged)."""
    return a.node if isinstance(a, Sym) else a


register_concrete(Sym, _value)
