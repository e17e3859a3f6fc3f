"""Recognise padding written as slice assignment in a functional ATen graph (torch.export).

Reference code pads the output of a 1x1 conv (+ BN) with that conv's response to a zero
pixel, so that a following valid kxk conv merges with it into one conv (R6 in
docs/algebra.md). It does so by writing into a tensor::

    y = F.pad(y, [p] * 4); y[:, :, 0:p, :] = v; y[:, :, -p:, :] = v; ...      # DBB, ECBSR
    out = v.expand(n, c, h + 2p, w + 2p).clone(); out[:, :, p:p + h, p:p + w] = y
    out = y.new_zeros(...); out[:, :, 1:-1, 1:-1] = y; out[:, :, 0] = v; ...

Functionalized, this is a chain of ``slice``/``select`` views, ``copy`` and ``slice_scatter``/
``select_scatter``. This module interprets such a chain as a *canvas*: the base tensor, then
rectangles painted over it in program order, each holding either one tensor (placed at an
offset) or a per-channel constant (a scalar, or a parameter expression broadcast as
``[1, C, 1, 1]``). If the visible picture is exactly "tensor ``x`` in the middle, one constant
``v`` everywhere else", the chain is the padding ``pad(x - v) + v`` (or ``pad(x, value=v)`` for
a scalar), which is what the rest of the pipeline understands (``AffineConv.pad_value``).

Sizes may be symbolic (export keeps batch and spatial sizes dynamic). The picture is worked
out with concrete sizes, once at the example input's sizes and once at other sizes, so a
write whose position only coincides with the border at one size (``y[:, :, 9:10]`` for the
last row of a 10-row tensor) is not taken for padding. Anything else is left as it is: the
functional ops compute the right values, the block around them is just not merged.

>>> import torch.nn.functional as F
>>> class M(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.b = torch.nn.Parameter(torch.randn(4))
...     def forward(self, x):
...         y = F.pad(x, [1, 1, 1, 1])
...         v = self.b.view(1, -1, 1, 1)
...         y[:, :, 0:1, :] = v; y[:, :, -1:, :] = v; y[:, :, :, 0:1] = v; y[:, :, :, -1:] = v
...         return y
>>> ep = torch.export.export(M(), (torch.randn(2, 4, 5, 5),), strict=False).run_decompositions({})
>>> found = find_slice_paddings(ep.graph, [Sizes({})])
>>> [(p.pads, p.value.name) for p in found.values()]
[((1, 1, 1, 1), 'view')]
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..ir import bind_schema
from .canvas import (OPAQUE, Canvas, Const, Piece, Sizes, Unknown, bounds, contains, index_of, num_elements, place,
                     slice_of, squeeze, unsqueeze)

aten = torch.ops.aten

_INT_MAX = 2 ** 63 - 1


def _dtype(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


# -- canvas contents ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlicePadding:
    """``terminal`` equals ``x`` padded by ``pads`` (left, right, top, bottom) with ``value``."""

    terminal: fx.Node
    x: fx.Node
    pads: tuple[int, int, int, int]
    value: Any  # float, or a per-channel node
    key: Any


_VIEW_INTO = {aten.slice.Tensor, aten.select.int}
_SCATTER = {aten.slice_scatter.default, aten.select_scatter.default}
_CHANNEL_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
                  aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.view_copy.default,
                  aten.clone.default, aten.alias.default}
_BROADCASTS = {aten.expand.default, aten.expand_copy.default, aten.clone.default, aten.alias.default}
_FILLS = {
    aten.zeros.default: (0, 0.0), aten.ones.default: (0, 1.0), aten.full.default: (0, "fill_value"),
    aten.new_zeros.default: (1, 0.0), aten.new_ones.default: (1, 1.0), aten.new_full.default: (1, "fill_value"),
    aten.zeros_like.default: (None, 0.0), aten.ones_like.default: (None, 1.0),
    aten.full_like.default: (None, "fill_value"), aten.fill.Scalar: (None, "value"),
}
_EMPTY = {aten.empty.memory_format, aten.new_empty.default, aten.empty_like.default}


class _Interpreter:
    """Canvas of each node at one set of sizes (memoized)."""

    def __init__(self, sizes: Sizes, keys: dict[fx.Node, Any]) -> None:
        self.sizes = sizes
        self.keys = keys
        self.memo: dict[fx.Node, Canvas] = {}

    def canvas(self, node: Any) -> Canvas:
        if not isinstance(node, fx.Node):
            raise Unknown("not a node")
        if node not in self.memo:
            self.memo[node] = self._canvas(node)
        return self.memo[node]

    def _canvas(self, node: fx.Node) -> Canvas:
        shape = self.sizes.shape(node)
        t, a = node.target, node.args
        if node.op != "call_function":
            return self._tensor(node, shape)
        if t is aten.slice.Tensor:
            b = bind_schema(node)
            if self.sizes.int(b["step"]) != 1:
                raise Unknown("strided slice")
            base = self.canvas(b["self"])
            dim = _dim(b["dim"], b["self"])
            return slice_of(base, dim, *bounds(base.shape[dim], b["start"], b["end"], self.sizes))
        if t is aten.select.int:
            b = bind_schema(node)
            base = self.canvas(b["self"])
            dim = _dim(b["dim"], b["self"])
            i = index_of(base.shape[dim], b["index"], self.sizes)
            return squeeze(slice_of(base, dim, i, i + 1), dim)
        if t in _SCATTER:
            b = bind_schema(node)
            base = self.canvas(b["self"])
            dim = _dim(b["dim"], b["self"])
            if t is aten.slice_scatter.default:
                if self.sizes.int(b["step"]) != 1:
                    raise Unknown("strided slice_scatter")
                src = self.canvas(b["src"])
                lo, hi = bounds(base.shape[dim], b["start"], b["end"], self.sizes)
            else:
                src = unsqueeze(self.canvas(b["src"]), dim)
                lo = index_of(base.shape[dim], b["index"], self.sizes)
                hi = lo + 1
            return place(base, src, dim, lo, hi)
        if t is aten.copy.default:
            if _dtype(a[0]) != _dtype(node) or (isinstance(a[1], fx.Node) and _dtype(a[1]) != _dtype(node)):
                return Canvas.filled(shape, OPAQUE)
            return self._broadcast(a[1], shape, a[0])
        if t in (aten.pad.default, aten.constant_pad_nd.default):
            return self._pad(node, shape)
        if t in _FILLS:
            return Canvas.filled(shape, self._fill_value(node))
        if t in _EMPTY:
            return Canvas.filled(shape, OPAQUE)
        if t in (aten.clone.default, aten.alias.default) and isinstance(a[0], fx.Node):
            return self.canvas(a[0])
        if t in (aten.expand.default, aten.expand_copy.default):
            const = self._per_channel(a[0], shape)
            return Canvas.filled(shape, const if const is not None else OPAQUE)
        return self._tensor(node, shape)

    def _tensor(self, node: fx.Node, shape: tuple[int, ...]) -> Canvas:
        if len(shape) == 4:
            return Canvas.filled(shape, Piece(node, (0, 0, 0, 0)))
        return Canvas.filled(shape, OPAQUE)

    def _broadcast(self, src: Any, shape: tuple[int, ...], dst: fx.Node) -> Canvas:
        """``copy(dst, src)``: ``src`` broadcast to ``shape``."""
        if isinstance(src, (int, float)) and not isinstance(src, bool):
            return Canvas.filled(shape, Const(("scalar", float(src)), float(src)))
        if not isinstance(src, fx.Node):
            raise Unknown("copy from a non-tensor")
        const = self._per_channel_in(src, shape, _channel_position(dst, len(shape)))
        if const is not None:
            return Canvas.filled(shape, const)
        if self.sizes.shape(src) == shape:
            return self.canvas(src)
        return Canvas.filled(shape, OPAQUE)

    def _pad(self, node: fx.Node, shape: tuple[int, ...]) -> Canvas:
        x, pads = node.args[0], [self.sizes.int(p) for p in node.args[1]]
        if node.target is aten.pad.default:
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
            if mode != "constant":
                return self._tensor(node, shape)
        else:
            value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)
        value = 0.0 if value is None else value
        if len(shape) != 4 or len(pads) != 4 or min(pads) < 0 or not isinstance(value, (int, float)):
            return self._tensor(node, shape)
        left, _, top, _ = pads
        inner = self.sizes.shape(x)
        rect = ((0, shape[0]), (0, shape[1]), (top, top + inner[2]), (left, left + inner[3]))
        return Canvas(shape, [(tuple((0, s) for s in shape), Const(("scalar", float(value)), float(value))),
                              (rect, Piece(x, (0, 0, top, left)))])

    def _fill_value(self, node: fx.Node) -> Any:
        _, name = _FILLS[node.target]
        if isinstance(name, float):
            value = name
        else:
            schema = node.target._schema
            names = [arg.name for arg in schema.arguments]
            i = names.index(name)
            value = node.args[i] if i < len(node.args) else node.kwargs.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return OPAQUE
        return Const(("scalar", float(value)), float(value))

    def _per_channel(self, src: fx.Node, shape: tuple[int, ...]) -> Const | None:
        """The constant ``src`` broadcast to a rank-4 ``shape`` holds, if it is per channel."""
        return self._per_channel_in(src, shape, 1 if len(shape) == 4 else None)

    def _per_channel_in(self, src: fx.Node, shape: tuple[int, ...], channel: int | None) -> Const | None:
        """Same, for ``shape`` whose dim ``channel`` is the channel dim (None: no channel dim left)."""
        if not isinstance(src, fx.Node) or (channel is not None and not 0 <= channel < len(shape)):
            return None
        channels = shape[channel] if channel is not None else 1
        rank = len(shape)
        cur, best = src, None
        while True:
            try:
                s = self.sizes.shape(cur)
            except Unknown:
                break
            if _is_per_channel(s, rank, channel, channels):
                best = cur
                nxt = cur.args[0] if cur.op == "call_function" and cur.target in _CHANNEL_VIEWS else None
            elif best is not None:
                break
            else:
                nxt = cur.args[0] if cur.op == "call_function" and cur.target in _BROADCASTS else None
            if not isinstance(nxt, fx.Node):
                break
            cur = nxt
        if best is None:
            return None
        if best.meta.get("val") is not None and _dtype(best) != _dtype(src):
            return None
        root = best  # views keep the channel order: key on the view's source of the same size
        numel = num_elements(self.sizes.shape(best))
        while root.op == "call_function" and root.target in _CHANNEL_VIEWS and isinstance(root.args[0], fx.Node):
            try:
                if num_elements(self.sizes.shape(root.args[0])) != numel:
                    break
            except Unknown:
                break
            root = root.args[0]
        return Const(("tensor", numel, _key(root, self.keys)), best)


def _channel_position(dst: Any, rank: int) -> int | None:
    """Where the channel dim sits in the value written through ``dst`` (a slice or select of a canvas)."""
    if rank == 4:
        return 1
    if isinstance(dst, fx.Node) and dst.op == "call_function" and dst.target is aten.select.int and rank == 3:
        dim = _dim(bind_schema(dst)["dim"], dst.args[0])
        return None if dim == 1 else (0 if dim == 0 else 1)
    return -1  # unknown layout: never per channel


def _is_per_channel(shape: tuple[int, ...], rank: int, channel: int | None, channels: int) -> bool:
    if len(shape) > rank:
        if any(d != 1 for d in shape[: len(shape) - rank]):
            return False
        shape = shape[len(shape) - rank:]
    shape = (1,) * (rank - len(shape)) + tuple(shape)
    if channel == -1:
        return False
    for i, d in enumerate(shape):
        if i == channel:
            if d not in (1, channels):
                return False
        elif d != 1:
            return False
    return True


def _key(node: Any, keys: dict[fx.Node, Any]) -> Any:
    """A structural key: two parameter expressions written twice compare equal."""
    if isinstance(node, fx.Node):
        if node not in keys:
            if node.op == "get_attr":
                keys[node] = ("attr", node.target)
            elif node.op == "call_function":
                keys[node] = (node.target, _key(tuple(node.args), keys),
                              tuple(sorted((k, _key(v, keys)) for k, v in node.kwargs.items())))
            else:
                keys[node] = ("node", node)
        return keys[node]
    if isinstance(node, (list, tuple)):
        return tuple(_key(a, keys) for a in node)
    return node


def _dim(dim: Any, node: Any) -> int:
    rank = len(node.meta["val"].shape) if isinstance(node, fx.Node) and "val" in node.meta else 4
    dim = int(dim)
    return dim + rank if dim < 0 else dim


def _resolve(c: Canvas, sizes: Sizes) -> tuple[fx.Node, tuple[int, int, int, int], Const | None] | None:
    """``(x, pads, constant)`` if the canvas is ``x`` padded with one constant, else None."""
    if len(c.shape) != 4:
        return None
    extents = {}
    for _, content in c.layers:
        if isinstance(content, Piece) and content not in extents:
            extents[content] = tuple((o, o + s) for o, s in zip(content.offset, sizes.shape(content.node)))
    cuts = []
    for d in range(4):
        points = {0, c.shape[d]}
        for rect in [r for r, _ in c.layers] + list(extents.values()):
            points.update(rect[d])
        cuts.append(sorted(p for p in points if 0 <= p <= c.shape[d]))
    intervals = [list(zip(p[:-1], p[1:])) for p in cuts]
    piece: Piece | None = None
    const: Const | None = None
    piece_cells: set[tuple] = set()
    for cell in itertools.product(*intervals):
        top = None
        for rect, content in reversed(c.layers):
            if contains(rect, cell):
                top = content
                break
        if top is None or top is OPAQUE:
            return None
        if isinstance(top, Piece):
            if piece is not None and piece != top:
                return None
            piece = top
            piece_cells.add(cell)
        else:
            if const is not None and const.key != top.key:
                return None
            const = const or top
    if piece is None:
        return None
    extent = extents[piece]
    if extent[0] != (0, c.shape[0]) or extent[1] != (0, c.shape[1]):
        return None
    if any(lo < 0 or hi > size for (lo, hi), size in zip(extent, c.shape)):
        return None
    expected = {cell for cell in itertools.product(*intervals) if contains(extent, cell)}
    if piece_cells != expected:
        return None
    top, left = piece.offset[2], piece.offset[3]
    pads = (left, c.shape[3] - extent[3][1], top, c.shape[2] - extent[2][1])
    return piece.node, pads, const


def _is_terminal(node: fx.Node) -> bool:
    """A scatter whose value is read as a whole (not only viewed or written into again)."""
    for user in node.users:
        if user.op != "call_function":
            return True
        if user.target in _VIEW_INTO and user.args[0] is node:
            continue
        if user.target in _SCATTER:
            continue
        if user.target is aten.copy.default and user.args[0] is node:
            continue
        return True
    return False


def find_slice_paddings(graph: fx.Graph, sizes: list[Sizes]) -> dict[fx.Node, SlicePadding]:
    """Each terminal scatter that is a padding of one tensor with one per-channel value.

    ``sizes``: the size assignments to check it at (the example's sizes first); the result
    must be the same at all of them.
    """
    keys: dict[fx.Node, Any] = {}
    interpreters = [_Interpreter(s, keys) for s in sizes]
    found: dict[fx.Node, SlicePadding] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _SCATTER or not _is_terminal(node):
            continue
        results = []
        for interp in interpreters:
            try:
                results.append(_resolve(interp.canvas(node), interp.sizes))
            except Unknown:
                results.append(None)
        first = results[0]
        if first is None or any(r is None or r[0] is not first[0] or r[1] != first[1]
                                or (r[2] is None) != (first[2] is None)
                                or (r[2] is not None and r[2].key != first[2].key) for r in results):
            continue
        x, pads, const = first
        value = 0.0 if const is None else const.value
        found[node] = SlicePadding(node, x, pads, value, None if const is None else const.key)
    return found


__all__ = ["Sizes", "SlicePadding", "find_slice_paddings"]
