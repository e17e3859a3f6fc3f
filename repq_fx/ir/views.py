"""Typed views of the canonical ops: a node's arguments bound by name, one class per op.

Every later stage reads a canonical node through its view instead of decoding ``node.args``
by position: ``ConvView.of(node).groups``. ``of`` also binds a call written with keyword
arguments or defaults left out (what canonicalize normalizes), and ``args()`` gives the
canonical positional arguments back.

>>> import torch, torch.fx as fx, torch.nn.functional as F
>>> gm = fx.symbolic_trace(lambda x, w: F.conv2d(x, w, groups=2))
>>> conv = ConvView.of(next(n for n in gm.graph.nodes if n.op == "call_function"))
>>> conv.x.name, conv.stride, conv.groups, len(conv.args())
('x', 1, 2, 7)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.fx as fx

from .graph import fetch_attr

V = TypeVar("V", bound="View")

Arg = Any  # an argument: a node, a number, or a structure of them
Ints = Any  # an int or a tuple of ints (a node where a rule must refuse it: computed at run time)
_ALIASES = {"input": "x", "self": "x"}  # torch's names of the tensor argument


@dataclass(frozen=True)
class View:
    """A canonical node's arguments by name (subclasses list them as fields, in canonical order)."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The argument names, in canonical (positional) order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls: type[V], node: fx.Node) -> V:
        """``node``'s positional and keyword arguments bound to the fields (keywords it has no field for are
        not read; a field ``node`` does not give takes its default)."""
        names = cls.names()
        bound = dict(zip(names, node.args))
        for key, value in node.kwargs.items():
            key = key if key in names else _ALIASES.get(key, key)
            if key in names:
                bound[key] = value
        return cls(**bound)

    @classmethod
    def is_canonical(cls, node: fx.Node) -> bool:
        """Every argument given, positionally (the form canonicalize writes)."""
        return len(node.args) == len(cls.names()) and not node.kwargs

    def args(self) -> tuple[Any, ...]:
        """The canonical positional arguments."""
        return tuple(getattr(self, name) for name in self.names())

    @classmethod
    def argument_name(cls, position: int | str) -> str:
        """The name of a positional argument (a keyword names itself).

        >>> CatView.argument_name(1), CatView.argument_name(5)
        ('dim', 'argument 5')
        """
        if isinstance(position, str):
            return position
        names = cls.names()
        return names[position] if position < len(names) else f"argument {position}"


@dataclass(frozen=True)
class ConvView(View):
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``."""

    x: fx.Node
    weight: Arg  # [out, in / groups, kh, kw]: a get_attr, or computed from parameters
    bias: Arg | None = None
    stride: Ints = 1
    padding: Ints | str = 0  # a string ('same', 'valid') only where the kernel's shape was unknown
    dilation: Ints = 1
    groups: int = 1

    def weight_owner(self, root: torch.nn.Module) -> str:
        """``a.b`` for a weight read as the tensor ``get_attr a.b.weight`` of ``root`` ("" for a computed weight)."""
        w = self.weight
        if isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(fetch_attr(root, w.target), torch.Tensor):
            return w.target.rpartition(".")[0]
        return ""


@dataclass(frozen=True)
class BatchNormView(View):
    """``ir.batch_norm(x, <get_attr of the BatchNorm module>)``."""

    x: fx.Node
    module: fx.Node  # get_attr of the BatchNorm module


@dataclass(frozen=True)
class AvgPoolView(View):
    """``F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)``."""

    x: fx.Node
    kernel_size: Ints
    stride: Ints | None = None
    padding: Ints = 0
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None


@dataclass(frozen=True)
class PadView(View):
    """``F.pad(x, pad, mode, value)``."""

    x: fx.Node
    pad: tuple[int, ...]
    mode: str = "constant"
    value: float | None = None


@dataclass(frozen=True)
class CropView(View):
    """``x[index]`` (``operator.getitem``): a crop ``x[:, :, a:-b, c:-d]`` when the rules accept it."""

    x: fx.Node
    index: Any  # a tuple of slices (and Ellipsis)


@dataclass(frozen=True)
class ArithView(View):
    """``operator.add/sub/mul/truediv(a, b)`` and ``operator.neg(a)``."""

    a: Arg
    b: Arg | None = None


@dataclass(frozen=True)
class CatView(View):
    """``torch.cat(tensors, dim)``."""

    tensors: list[fx.Node] | fx.Node  # a node: a sequence computed at run time
    dim: int = 0


def bind_schema(node: fx.Node) -> dict[str, Any]:
    """The arguments of an ATen call (a torch.export graph's node) by schema name, defaults filled in.

    >>> import torch
    >>> gm = torch.export.export(torch.nn.Flatten(), (torch.randn(2, 3, 4),)).graph_module
    >>> bind_schema(next(n for n in gm.graph.nodes if n.op == "call_function"))
    {'self': input, 'start_dim': 1, 'end_dim': -1}
    """
    out: dict[str, Any] = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def conv_padding(padding: Any, weight_shape: Any, dilation: Any) -> Any:
    """A conv's ``padding`` as numbers: ``"valid"`` and ``"same"`` (odd kernels) resolved, None for ``"same"``
    with an even kernel (torch pads it asymmetrically); numbers pass through.

    >>> conv_padding("same", (8, 3, 3, 5), 1), conv_padding("valid", (8, 3, 3, 3), 2), conv_padding(1, (), 1)
    ((1, 2), (0, 0), 1)
    >>> conv_padding("same", (8, 3, 2, 2), [1]) is None
    True
    """
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return (0, 0)
    d = list(dilation) if isinstance(dilation, (list, tuple)) else [dilation, dilation]
    d = d * 2 if len(d) == 1 else d
    total = [di * (k - 1) for di, k in zip(d, tuple(weight_shape)[2:])]
    if any(t % 2 for t in total):
        return None
    return tuple(t // 2 for t in total)


__all__ = ["bind_schema", "View", "ConvView", "BatchNormView", "AvgPoolView", "PadView", "CropView", "ArithView",
           "CatView",
           "conv_padding"]
