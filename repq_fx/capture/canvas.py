"""A tensor as a canvas: a base, then rectangles painted over it in program order (for :mod:`.slice_padding`).

Each rectangle holds one tensor placed at an offset (:class:`Piece`), a per-channel constant
(:class:`Const`) or something else (:data:`OPAQUE`). Sizes are worked out concretely
(:class:`Sizes`: values of export's size symbols).

>>> c = place(Canvas.filled((1, 1, 4, 4), Const(0.0, 0.0)), Canvas.filled((1, 1, 2, 4), OPAQUE), 2, 1, 3)
>>> [content for _, content in visible(c.layers)]
[Const(key=0.0, value=0.0), 'opaque']
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

_INT_MAX = 2 ** 63 - 1


class Unknown(Exception):
    """A size or an op the canvas interpretation cannot follow (the chain is left as it is)."""


class Sizes:
    """Concrete values of the symbolic sizes (``sympy.Symbol -> int``) at which a canvas is worked out."""

    def __init__(self, env: dict[Any, int]) -> None:
        self.env = {k: sympy.Integer(v) for k, v in env.items()}

    def int(self, v: Any) -> int:
        if isinstance(v, fx.Node):
            v = v.meta.get("val")
        if isinstance(v, bool):
            raise Unknown("bool where an int was expected")
        if isinstance(v, int):
            return v
        if isinstance(v, torch.SymInt):
            expr = v.node.expr
            value = expr.xreplace(self.env) if self.env else expr
            if not value.is_number:
                value = sympy.sympify(value).subs(self.env)
            if not value.is_number:
                raise Unknown(f"size {expr} depends on a symbol with no value")
            return int(value)
        raise Unknown(f"not an int: {v!r}")

    def shape(self, node: Any) -> tuple[int, ...]:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            raise Unknown(f"{node} has no tensor value")
        return tuple(self.int(s) for s in val.shape)


@dataclass(frozen=True)
class Const:
    """A per-channel constant: ``value`` is a float or a node broadcast as ``[1, C, 1, 1]``."""

    key: Any  # structural key: equal keys are equal values
    value: Any


@dataclass(frozen=True)
class Piece:
    """Tensor ``node`` (rank 4) placed so that canvas position ``p`` holds ``node[p - offset]``."""

    node: fx.Node
    offset: tuple[int, ...]


OPAQUE = "opaque"  # anything else (a row of a tensor, uninitialized memory, ...)


Rect = tuple[tuple[int, int], ...]


@dataclass
class Canvas:
    shape: tuple[int, ...]
    layers: list[tuple[Rect, Any]] = field(default_factory=list)  # painted in order, last on top

    @staticmethod
    def filled(shape: tuple[int, ...], content: Any) -> "Canvas":
        return Canvas(shape, [(tuple((0, s) for s in shape), content)])


def num_elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def index_of(length: int, index: Any, sizes: Sizes) -> int:
    i = sizes.int(index)
    i = i + length if i < 0 else i
    if not 0 <= i < length:
        raise Unknown("index out of range")
    return i


def bounds(length: int, start: Any, end: Any, sizes: Sizes) -> tuple[int, int]:
    """Python slice bounds ``[start:end]`` on a dim of ``length`` (clamped, as torch does)."""
    lo = 0 if start is None else sizes.int(start)
    hi = length if end is None else sizes.int(end)
    if hi >= _INT_MAX:
        hi = length
    lo = lo + length if lo < 0 else lo
    hi = hi + length if hi < 0 else hi
    lo, hi = min(max(lo, 0), length), min(max(hi, 0), length)
    return lo, max(lo, hi)


def slice_of(c: Canvas, dim: int, lo: int, hi: int) -> Canvas:
    shape = c.shape[:dim] + (hi - lo,) + c.shape[dim + 1:]
    layers = []
    for rect, content in c.layers:
        a, b = max(rect[dim][0], lo), min(rect[dim][1], hi)
        if a >= b:
            continue
        new = rect[:dim] + ((a - lo, b - lo),) + rect[dim + 1:]
        if isinstance(content, Piece):
            content = Piece(content.node, content.offset[:dim] + (content.offset[dim] - lo,) + content.offset[dim + 1:])
        layers.append((new, content))
    return Canvas(shape, layers)


def squeeze(c: Canvas, dim: int) -> Canvas:
    shape = c.shape[:dim] + c.shape[dim + 1:]
    return Canvas(shape, [(r[:dim] + r[dim + 1:], content if isinstance(content, Const) else OPAQUE)
                          for r, content in c.layers])


def unsqueeze(c: Canvas, dim: int) -> Canvas:
    shape = c.shape[:dim] + (1,) + c.shape[dim:]
    return Canvas(shape, [(r[:dim] + ((0, 1),) + r[dim:], content if isinstance(content, Const) else OPAQUE)
                          for r, content in c.layers])


def place(base: Canvas, src: Canvas, dim: int, lo: int, hi: int) -> Canvas:
    """``slice_scatter(base, src, dim, lo, hi)``."""
    if len(src.shape) != len(base.shape) or src.shape[dim] != hi - lo or any(
            s != b for i, (s, b) in enumerate(zip(src.shape, base.shape)) if i != dim):
        raise Unknown("scatter of a source whose shape does not fit")
    layers = list(base.layers)
    for rect, content in src.layers:
        new = rect[:dim] + ((rect[dim][0] + lo, rect[dim][1] + lo),) + rect[dim + 1:]
        if isinstance(content, Piece):
            content = Piece(content.node, content.offset[:dim] + (content.offset[dim] + lo,) + content.offset[dim + 1:])
        layers.append((new, content))
    return Canvas(base.shape, visible(layers))


def visible(layers: list[tuple[Rect, Any]]) -> list[tuple[Rect, Any]]:
    """Drop layers that a later layer covers completely."""
    kept: list[tuple[Rect, Any]] = []
    for i, (rect, content) in enumerate(layers):
        if any(contains(later, rect) for later, _ in layers[i + 1:]):
            continue
        kept.append((rect, content))
    return kept


def contains(outer: Rect, inner: Rect) -> bool:
    return all(o[0] <= i[0] and i[1] <= o[1] for o, i in zip(outer, inner))
