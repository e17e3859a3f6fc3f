"""Which canonical nodes are linear, and the affine conv map of each: a table of rules by target.

A rule looks at one node and returns either a :class:`LinearOp` (the node's tensor
inputs and how to build its map) or a :class:`NoMatch` saying why the node is not a
linear op; ``explain`` shows those reasons. Parameters reach the map builders
through a ``Values`` object, so the same rules serve the numeric merge (tensors),
``prepare`` (symbolic values that emit FX nodes) and any BN-statistics mode.

>>> import torch.nn as nn
>>> from repq_fx.capture import capture
>>> gm = capture(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
>>> conv = next(n for n in gm.graph.nodes if n.op == "call_function")
>>> op = linear_op(conv, tensor_nodes(gm))
>>> op.kind, [i.name for i in op.inputs]
('unary', ['input_1'])
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..algebra import AffineConv, NoMatch, ops
from ..errors import RegistrationError
from ..ir import (ArithView, AvgPoolView, BatchNormView, CatView, ConvView, CropView, PadView, RuleTable,
                  View, batch_norm, input_dependent, is_size_value)
from ..ir.records import RECORDS, label_function, target_name


class Values(Protocol):
    """Where the parameters of an op come from (numbers for merge, FX nodes for prepare)."""

    dtype: torch.dtype

    def param(self, arg: Any) -> Any:
        """The value of a parameter-valued argument (a node, a constant, a list of them)."""

    def bn(self, node: fx.Node, module: torch.nn.Module, before: AffineConv | None) -> AffineConv | NoMatch:
        """The map of a BatchNorm node whose input is ``before`` (None: the block input)."""


Builder = Callable[[Values, int, "AffineConv | None"], "AffineConv | NoMatch"]


@dataclass(frozen=True)
class LinearOp:
    """How one node acts on its tensor inputs.

    ``kind`` is ``"unary"`` (an affine conv map of ``inputs[0]``, built by ``build``),
    ``"sum"`` (``sum_i signs[i] * inputs[i]``) or ``"cat"`` (channel concat).
    """

    node: fx.Node
    kind: str
    inputs: tuple[fx.Node, ...]
    build: Builder | None = None  # unary only: (values, in_channels, input map) -> map
    signs: tuple[float, ...] = ()  # sum only
    is_conv: bool = False  # a conv op (a region with none is not a block)


Rule = Callable[[fx.Node, set], "LinearOp | NoMatch"]
RULES: RuleTable[Rule] = RuleTable("linear-op rule")


def register_op(*targets: Any, label: str | Callable[[fx.GraphModule, fx.Node], str] | None = None
                ) -> Callable[[Rule], Rule]:
    """Register a linear-op rule for canonical node targets (``call_function`` targets); a decorator.

    ``label`` is how ``explain`` names the op in a block's branches (a string, or a function of the graph
    module and the node); by default an op the package has no record of is named by its function's name.
    docs/adding-an-op.md walks through a whole example.

    >>> def flip(x):  # a function the model calls (torch.fx.wrap keeps it one node when traced)
    ...     return -x
    >>> @register_op(flip, label="flip")
    ... def _flip(node, tensors):
    ...     def build(values, channels, before):
    ...         return ops.diagonal(-torch.ones(channels, dtype=values.dtype), None)
    ...     return LinearOp(node, "unary", (node.args[0],), build)
    """
    if label is not None and not (isinstance(label, str) or callable(label)):
        raise RegistrationError(f"register_op(label=...) takes a string or a function (gm, node) -> str; got "
                                f"{type(label).__name__}")
    plain = [t for t in targets if not callable(t) or isinstance(t, (type, nn.Module))]
    if not targets or plain:
        raise RegistrationError(f"register_op() takes the functions a canonical graph calls (call_function "
                                f"targets such as torch.negative); got {plain[0] if plain else 'none'!r}. Modules "
                                "and methods are canonicalized into functions first (capture/canonicalize.py)")
    tables = RULES.register(*targets)  # refuses a key of no kind the table knows, before anything is registered

    def deco(rule: Rule) -> Rule:
        if not callable(rule):
            raise RegistrationError(f"register_op(...) decorates a rule (node, tensor nodes) -> LinearOp | NoMatch; "
                                    f"got {type(rule).__name__}")
        for target in targets:
            if label is not None or RECORDS.for_function(target) is None:
                label_function(target, label if label is not None else target_name)
        return tables(rule)
    return deco


def tensor_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on a model input (the rest are parameter expressions)."""
    return input_dependent(gm.graph)


class RuntimeArgument(NoMatch):
    """An op that would be linear, but an argument of it is computed at run time (``x.size(3)``).

    The op stays as it is, a boundary between blocks; ``explain`` lists it with this reason.
    """


def linear_op(node: fx.Node, tensors: set[fx.Node]) -> LinearOp | NoMatch:
    """The rule's verdict on ``node`` (a tensor node)."""
    if node.op != "call_function":
        what = node.target if node.op == "call_module" else f"{node.op} {node.target}"
        return NoMatch(f"{what} is not a linear op")
    if is_size_value(node):
        return NoMatch(f"{node.name} computes a size, not a tensor")
    rule = RULES.for_function(node.target)
    if rule is None:
        return NoMatch(f"{getattr(node.target, '__name__', node.target)} is not a linear op")
    refused = _sizes_of_the_input(node, tensors)
    return rule(node, tensors) if refused is None else refused


def _argument_name(node: fx.Node, position: int | str) -> str:
    record = RECORDS.for_function(node.target)
    view = record.view if record is not None and record.view is not None else View
    return view.argument_name(position)


def _sizes_of_the_input(node: fx.Node, tensors: set[fx.Node]) -> RuntimeArgument | None:
    """Refuse an op with an argument computed from the input's shape (``avg_pool2d(x, x.size(3))``).

    Such an op is a different linear map for every input size (a global pool, a pad to a multiple
    of 2, a crop back to the input size), so no fixed conv computes it.
    """
    arguments = [*enumerate(node.args), *node.kwargs.items()]
    for position, arg in arguments:
        for n in _nodes_in(arg):
            if n in tensors and is_size_value(n):
                name = _argument_name(node, position)
                return RuntimeArgument(f"{getattr(node.target, '__name__', node.target)}: {name} is computed at run "
                                       f"time from the input's shape ({spell_size(n)}), so it is not one fixed "
                                       "linear map; kept as it is (a boundary between blocks)")
    return None


def spell_size(node: fx.Node, depth: int = 4) -> str:
    """A size expression as the model's code wrote it, roughly: ``x.size(3)``, ``x.shape[2] // 2``.

    >>> import torch.fx as fx
    >>> gm = fx.symbolic_trace(lambda x: x.shape[2] // 2)
    >>> spell_size(list(gm.graph.nodes)[-2])
    'x.shape[2] // 2'
    """
    def arg(a: Any) -> str:
        return spell_size(a, depth - 1) if isinstance(a, fx.Node) else repr(a)

    if depth == 0 or not is_size_value(node):
        return node.name
    if node.op == "call_method":
        return f"{arg(node.args[0])}.{node.target}({', '.join(arg(a) for a in node.args[1:])})"
    if node.op == "call_function" and node.target is getattr:
        return f"{arg(node.args[0])}.{node.args[1]}"
    if node.op == "call_function" and node.target is operator.getitem:
        return f"{arg(node.args[0])}[{arg(node.args[1])}]"
    symbols = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
               operator.floordiv: "//", operator.mod: "%", operator.pow: "**"}
    if node.op == "call_function" and node.target in symbols and len(node.args) == 2:
        return f"{arg(node.args[0])} {symbols[node.target]} {arg(node.args[1])}"
    return node.name


def _fixed(node: fx.Node, **arguments: Any) -> RuntimeArgument | None:
    """Refuse an op whose structural arguments (stride, padding, kernel size, dim...) are not constants."""
    for name, value in arguments.items():
        found = _nodes_in(value)
        if found:
            return RuntimeArgument(f"{getattr(node.target, '__name__', node.target)}: {name} is computed at run time "
                                   f"({found[0].name}), so it is not one fixed linear map; kept as it is")
    return None


def _params_only(node: fx.Node, args: list[Any], tensors: set[fx.Node]) -> NoMatch | None:
    for a in args:
        for n in _nodes_in(a):
            if n in tensors:
                return NoMatch(f"{node.name}: an argument ({n.name}) depends on the input, not only on parameters")
    return None


def _nodes_in(a: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(a, out.append)
    return out


@register_op(F.conv2d)
def _conv(node: fx.Node, tensors: set[fx.Node]) -> LinearOp | NoMatch:
    # conv2d(x, W, b) -> AffineConv(W, b)
    if not ConvView.is_canonical(node):
        return NoMatch(f"{node.name}: conv2d call not in canonical form")
    v = ConvView.of(node)
    if isinstance(v.padding, str):
        return NoMatch(f"{node.name}: padding={v.padding!r} on a kernel of unknown shape; pass a number")
    for bad in (_params_only(node, [v.weight, v.bias], tensors),
                _fixed(node, stride=v.stride, padding=v.padding, dilation=v.dilation, groups=v.groups)):
        if bad is not None:  # NoMatch is falsy
            return bad

    def build(values: Values, in_channels: int, before: AffineConv | None) -> AffineConv | NoMatch:
        return ops.conv(values.param(v.weight), values.param(v.bias), stride=v.stride, padding=v.padding,
                        dilation=v.dilation, groups=v.groups)

    return LinearOp(node, "unary", (v.x,), build, is_conv=True)


@register_op(batch_norm)
def _batch_norm(node: fx.Node, tensors: set[fx.Node]) -> LinearOp | NoMatch:
    # batch_norm(x, bn) -> diag(gamma / sigma) + (beta - mu * gamma / sigma)
    v = BatchNormView.of(node)

    def build(values: Values, in_channels: int, before: AffineConv | None) -> AffineConv | NoMatch:
        return values.bn(node, values.param(v.module), before)

    return LinearOp(node, "unary", (v.x,), build)


@register_op(F.avg_pool2d)
def _avg_pool(node: fx.Node, tensors: set[fx.Node]) -> LinearOp | NoMatch:
    # avg_pool2d(x, k, s, p) -> depthwise conv with 1/(kh*kw)
    v = AvgPoolView.of(node)
    bad = _fixed(node, **{name: getattr(v, name) for name in AvgPoolView.names()[1:]})
    if bad is not None:
        return bad

    def build(values: Values, in_channels: int, before: AffineConv | None) -> AffineConv | NoMatch:
        return ops.avg_pool(in_channels, v.kernel_size, v.stride, v.padding, ceil_mode=v.ceil_mode,
                            count_include_pad=v.count_include_pad, divisor_override=v.divisor_override,
                            dtype=values.dtype)

    return LinearOp(node, "unary", (v.x,), build)


@register_op(F.pad)
def _pad(node: fx.Node, tensors: set[fx.Node]) -> LinearOp | NoMatch:
    # pad(x, pads, "constant", v) -> identity conv with per-side padding, pad value v
    x, pads, mode, value = PadView.of(node).args()
    bad = _fixed(node, pad=pads, mode=mode)
    if bad is not None:
        return bad
    if not isinstance(pads, (tuple, list)):
        return NoMatch(f"{node.name}: pad widths {pads!r} are not a tuple of ints")
    if mode != "constant":
        return NoMatch(f"{node.name}: pad mode {mode!r} is not zeros/constant; a conv cannot reproduce its borders")
    if not isinstance(value, (int, float)):
        return NoMatch(f"{node.name}: pad value is not a constant")

    def build(values: Values, in_channels: int, before: AffineConv | None) -> AffineConv | NoMatch:
        return ops.pad(in_channels, pads, float(value), values.dtype)

    return LinearOp(node, "unary", (x,), build)


@register_op(operator.getitem)
def _crop(node: fx.Node, tensors: set[fx.Node]) -> LinearOp | NoMatch:
    # x[:, :, a:-b, c:-d] -> identity conv with negative padding (a crop)
    x, index = CropView.of(node).args()
    pads = _crop_pads(index)
    if pads is None:
        return NoMatch(f"{node.name}: indexing other than a spatial crop x[:, :, a:-b, c:-d]")

    def build(values: Values, in_channels: int, before: AffineConv | None) -> AffineConv | NoMatch:
        return ops.pad(in_channels, pads, 0.0, values.dtype)

    return LinearOp(node, "unary", (x,), build)


def _crop_pads(index: Any) -> list[int] | None:
    if not isinstance(index, tuple):
        return None
    items = list(index)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (4 - len(items) + 1) + items[at + 1:]
    items += [slice(None)] * (4 - len(items))
    if len(items) != 4 or any(i != slice(None) for i in items[:2]):
        return None
    pads = []
    for s in items[2:]:
        if not isinstance(s, slice) or s.step not in (None, 1):
            return None
        start = s.start or 0
        stop = s.stop
        if not isinstance(start, int) or start < 0 or not (stop is None or (isinstance(stop, int) and stop < 0)):
            return None
        pads.append((-start, stop or 0))
    (top, bottom), (left, right) = pads
    return [left, right, top, bottom]


@register_op(operator.add, operator.sub)
def _add_sub(node: fx.Node, tensors: set[fx.Node]) -> LinearOp | NoMatch:
    # a + b, a - b of two tensors -> sum; x + p, x - p, p - x with a per-channel p -> shift
    a, b = ArithView.of(node).args()
    sign = 1.0 if node.target is operator.add else -1.0
    a_is, b_is = a in tensors, b in tensors
    if a_is and b_is:
        return LinearOp(node, "sum", (a, b), signs=(1.0, sign))
    x, p = (a, b) if a_is else (b, a)
    scale = -1.0 if (sign < 0 and not a_is) else 1.0  # p - x
    shift_sign = sign if a_is else 1.0
    return _per_channel_rule(node, x, p, tensors, kind="shift", scale=scale, shift_sign=shift_sign)


@register_op(operator.mul)
def _mul(node: fx.Node, tensors: set[fx.Node]) -> LinearOp | NoMatch:
    # x * p with a per-channel or scalar p -> diagonal scale
    a, b = ArithView.of(node).args()
    if a in tensors and b in tensors:
        return NoMatch(f"{node.name}: product of two input-dependent tensors is not linear")
    x, p = (a, b) if a in tensors else (b, a)
    return _per_channel_rule(node, x, p, tensors, kind="scale")


@register_op(operator.truediv)
def _div(node: fx.Node, tensors: set[fx.Node]) -> LinearOp | NoMatch:
    # x / p with a per-channel or scalar p -> diagonal scale 1/p
    a, b = ArithView.of(node).args()
    if b in tensors:
        return NoMatch(f"{node.name}: division by an input-dependent tensor is not linear")
    return _per_channel_rule(node, a, b, tensors, kind="inverse")


@register_op(operator.neg, torch.neg)
def _neg(node: fx.Node, tensors: set[fx.Node]) -> LinearOp | NoMatch:
    # -x -> diagonal scale -1
    return _per_channel_rule(node, ArithView.of(node).a, -1.0, tensors, kind="scale")


def _per_channel_rule(node: fx.Node, x: Any, p: Any, tensors: set[fx.Node], *, kind: str,
                      scale: float = 1.0, shift_sign: float = 1.0) -> LinearOp | NoMatch:
    bad = _params_only(node, [p], tensors)
    if bad is not None:  # NoMatch is falsy
        return bad

    def build(values: Values, in_channels: int, before: AffineConv | None) -> AffineConv | NoMatch:
        v = values.param(p)
        vec = _as_channel_vector(v, in_channels, values.dtype)
        if vec is None:
            shape = tuple(getattr(v, "shape", ()))
            return NoMatch(f"{node.name}: operand of shape {shape} is not per-channel ([C,1,1] or a scalar)")
        ones = torch.ones(in_channels, dtype=values.dtype)
        if kind == "scale":
            return ops.diagonal(vec, None)
        if kind == "inverse":
            return ops.diagonal(1 / vec, None)
        shift = vec if shift_sign == 1.0 else -vec
        return ops.diagonal(ones * scale, shift)

    return LinearOp(node, "unary", (x,), build)


def _as_channel_vector(v: Any, channels: int, dtype: torch.dtype) -> Any | None:
    """A per-channel operand as a [C] vector, or None if it is not per-channel."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.full((channels,), float(v), dtype=dtype)
    shape = tuple(getattr(v, "shape", (None,)))
    if None in shape:
        return None
    if len(shape) == 0 or all(s == 1 for s in shape):
        return v.reshape(1).expand(channels)
    trailing = shape[-2:] == (1, 1) if len(shape) >= 3 else False
    if len(shape) in (3, 4) and trailing and shape[-3] == channels and all(s == 1 for s in shape[:-3]):
        return v.reshape(channels)
    return None


@register_op(torch.cat)
def _cat(node: fx.Node, tensors: set[fx.Node]) -> LinearOp | NoMatch:
    # cat([a(x), b(x)], dim=1) -> concat of maps
    parts, dim = CatView.of(node).args()
    bad = _fixed(node, dim=dim)
    if bad is not None:
        return bad
    if not isinstance(parts, (tuple, list)):
        return NoMatch(f"{node.name}: concat of a sequence computed at run time ({parts})")
    if dim not in (1, -3):
        return NoMatch(f"{node.name}: concat along dim {dim}, not channels")
    if not all(isinstance(p, fx.Node) and p in tensors for p in parts):
        return NoMatch(f"{node.name}: concat with parameter tensors")
    return LinearOp(node, "cat", tuple(parts))
