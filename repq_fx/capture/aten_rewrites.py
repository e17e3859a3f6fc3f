"""The ATen op table of the torch.export front end: each ATen op's canonical (or FX front end) form.

One rule per op in a :class:`repq_fx.ir.RuleTable` keyed by ATen op (the packet: every overload);
a rule returns the replacement, :data:`~repq_fx.ir.KEEP` or :data:`~repq_fx.ir.ERASED`.

>>> ATEN_REWRITES.for_function(torch.ops.aten.conv2d.default).__name__
'_conv'
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from ..ir import (ERASED, KEEP, AvgPoolView, CatView, ConvView, PadView, RuleTable, apply, bind_schema, conv_padding,
                  input_dependent, insert_call)
from .aten_context import Context, is_tensor, op_name, packet, where
from .aten_sizes import is_concrete, same_size

aten = torch.ops.aten
_INT_MAX = 2 ** 63 - 1

Rewrite = Callable[[Context, fx.Node, dict], Any]  # (context, node, its arguments by schema name) -> answer
ATEN_REWRITES: RuleTable[Rewrite] = RuleTable("ATen canonical rewrite")


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@ATEN_REWRITES.register(aten.conv2d, aten.convolution, aten._convolution)
def _conv(ctx: Context, node: fx.Node, a: dict) -> Any:
    # conv2d / convolution(x, w, b, stride, padding, dilation, transposed=False, ..., groups) -> F.conv2d
    if a.get("transposed"):
        return KEEP
    w = a["weight"]
    wval = w.meta.get("val") if isinstance(w, fx.Node) else None
    if not isinstance(wval, torch.Tensor) or wval.dim() != 4:
        return KEEP
    padding = a["padding"]
    if isinstance(padding, str):
        padding = conv_padding(padding, tuple(wval.shape), a["dilation"])
        if padding is None:
            return KEEP
    if isinstance(padding, (list, tuple)) and len(padding) == 1:
        padding = (padding[0], padding[0])
    view = ConvView(a["input"], w, a["bias"], _tuple(a["stride"]), _tuple(padding), _tuple(a["dilation"]),
                    int(a["groups"]))
    return insert_call(node, F.conv2d, view.args())


@ATEN_REWRITES.register(aten.linear)
def _linear(ctx: Context, node: fx.Node, a: dict) -> Any:
    return insert_call(node, F.linear, (a["input"], a["weight"], a["bias"]))


@ATEN_REWRITES.register(aten.relu)
def _relu(ctx: Context, node: fx.Node, a: dict) -> Any:
    return insert_call(node, F.relu, (a["self"],))


def _arith(op: Any, reflected: bool = False) -> Rewrite:
    # add/sub(self, other, alpha) -> self op alpha * other; rsub(self, other, alpha) -> other - alpha * self
    def rewrite(ctx: Context, node: fx.Node, a: dict) -> Any:
        if not is_tensor(node):
            return KEEP
        x, y = (a["other"], a["self"]) if reflected else (a["self"], a["other"])
        alpha = a.get("alpha", 1)
        if alpha not in (1, None):
            with ctx.graph.inserting_before(node):
                y = ctx.graph.call_function(operator.mul, (y, alpha))
        return insert_call(node, op, (x, y))
    return rewrite


ATEN_REWRITES.register(aten.add)(_arith(operator.add))
ATEN_REWRITES.register(aten.sub)(_arith(operator.sub))
ATEN_REWRITES.register(aten.rsub)(_arith(operator.sub, reflected=True))
ATEN_REWRITES.register(aten.mul)(_arith(operator.mul))


@ATEN_REWRITES.register(aten.div)
def _div(ctx: Context, node: fx.Node, a: dict) -> Any:
    if not is_tensor(node) or a.get("rounding_mode") is not None:
        return KEEP
    return insert_call(node, operator.truediv, (a["self"], a["other"]))


@ATEN_REWRITES.register(aten.neg)
def _neg(ctx: Context, node: fx.Node, a: dict) -> Any:
    return insert_call(node, operator.neg, (a["self"],))


@ATEN_REWRITES.register(aten.cat, aten.concat, aten.concatenate)
def _cat(ctx: Context, node: fx.Node, a: dict) -> Any:
    return insert_call(node, torch.cat, CatView(list(a["tensors"]), int(a["dim"])).args())


@ATEN_REWRITES.register(aten.pad)
def _pad(ctx: Context, node: fx.Node, a: dict) -> Any:
    value = a.get("value")
    return insert_call(node, F.pad, PadView(a["self"], _tuple(a["pad"]), a["mode"],
                                            0.0 if value is None else float(value)).args())


@ATEN_REWRITES.register(aten.constant_pad_nd)
def _constant_pad(ctx: Context, node: fx.Node, a: dict) -> Any:
    view = PadView(a["self"], _tuple(a["pad"]), "constant", float(a.get("value") or 0.0))
    return insert_call(node, F.pad, view.args())


@ATEN_REWRITES.register(aten.avg_pool2d)
def _avg_pool(ctx: Context, node: fx.Node, a: dict) -> Any:
    view = AvgPoolView(a["self"], _tuple(a["kernel_size"]), _tuple(a["stride"]) or None, _tuple(a["padding"]),
                       bool(a["ceil_mode"]), bool(a["count_include_pad"]), a["divisor_override"])
    return insert_call(node, F.avg_pool2d, view.args())


@ATEN_REWRITES.register(aten.slice)
def _crop(ctx: Context, node: fx.Node, a: dict) -> Any:
    # slice(x, dim, start, end) with a full range -> x; on H or W -> x[:, :, a:-b] (a crop)
    x = a["self"]
    if not is_tensor(node) or not is_tensor(x) or a["step"] != 1:
        return KEEP
    start, end, rank = a["start"], a["end"], x.meta["val"].dim()
    dim = a["dim"] + rank if a["dim"] < 0 else a["dim"]
    if start in (None, 0) and (end is None or (isinstance(end, int) and end >= _INT_MAX)):
        return x
    if rank != 4 or dim not in (2, 3) or not isinstance(start, (int, type(None))) \
            or not isinstance(end, (int, type(None))):
        return KEEP
    start = start or 0
    stop = None if end is None or end >= _INT_MAX else end
    if start < 0 or (stop is not None and stop >= 0):
        return KEEP
    index: tuple = (slice(None), slice(None), slice(start, stop)) if dim == 2 else \
        (slice(None), slice(None), slice(None), slice(start, stop))
    return insert_call(node, operator.getitem, (x, index))


@ATEN_REWRITES.register(aten.clone, aten.contiguous)
def _clone(ctx: Context, node: fx.Node, a: dict) -> Any:
    # clone(x) of an input-dependent tensor -> x (the graph is functional)
    x = a["self"]
    return x if node in ctx.tensors and is_tensor(x) else KEEP


@ATEN_REWRITES.register(aten.dropout, aten.native_dropout, aten.feature_dropout, aten.alpha_dropout,
                        aten.feature_alpha_dropout)
def _dropout(ctx: Context, node: fx.Node, a: dict) -> Any:
    x = a.get("input", a.get("self"))
    p = float(a["p"])
    train = a.get("train", True)
    name = packet(node.target)
    if name == "native_dropout":
        getters = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if any(i != 0 and g.users for i, g in getters.items()) or len(getters) != len(node.users):
            raise UnsupportedOpError(f"{op_name(node)} at {where(node)}: the dropout mask is used by the model")
        if p == 0 or not train:
            out = x
        else:
            out = _dropout_module(ctx, node, x, p, name)
        for i, g in getters.items():
            if i == 0:
                g.replace_all_uses_with(out)
            ctx.graph.erase_node(g)
        ctx.graph.erase_node(node)
        return ERASED
    if p == 0 or not train:
        return x
    return _dropout_module(ctx, node, x, p, name)


def _dropout_module(ctx: Context, node: fx.Node, x: fx.Node, p: float, kind: str) -> fx.Node:
    cls = {"feature_dropout": nn.Dropout2d, "alpha_dropout": nn.AlphaDropout,
           "feature_alpha_dropout": nn.FeatureAlphaDropout}.get(kind, nn.Dropout)
    name = ctx.free_attr(f"{node.name}_module")
    ctx.root.add_module(name, cls(p))  # a module follows .train()/.eval(); the op's flag was baked
    with ctx.graph.inserting_before(node):
        new = ctx.graph.call_module(name, (x,))
    new.meta = dict(node.meta)
    val = node.meta.get("val")
    new.meta["val"] = val[0] if isinstance(val, (tuple, list)) else val
    return new


_FUNCTIONAL = {  # ATen packet -> (torch function, schema arguments passed positionally)
    "hardswish": (F.hardswish, ("self",)), "hardsigmoid": (F.hardsigmoid, ("self",)),
    "sigmoid": (torch.sigmoid, ("self",)), "tanh": (torch.tanh, ("self",)), "silu": (F.silu, ("self",)),
    "hardtanh": (F.hardtanh, ("self", "min_val", "max_val")),
    "leaky_relu": (F.leaky_relu, ("self", "negative_slope")),
    "adaptive_avg_pool2d": (F.adaptive_avg_pool2d, ("self", "output_size")),
    "_adaptive_avg_pool2d": (F.adaptive_avg_pool2d, ("self", "output_size")),
    "pixel_shuffle": (F.pixel_shuffle, ("self", "upscale_factor")),
    "pixel_unshuffle": (F.pixel_unshuffle, ("self", "downscale_factor")),
    "clamp": (torch.clamp, ("self", "min", "max")),
}


def _functional(ctx: Context, node: fx.Node, a: dict) -> Any:
    # hardswish(x) -> F.hardswish(x), ... (the forms the FX front end records)
    target, names = _FUNCTIONAL[packet(node.target)]
    if not is_tensor(node) or node.target._overloadname != "default":
        return KEEP
    return insert_call(node, target, tuple(_tuple(a[n]) for n in names))


ATEN_REWRITES.register(*(getattr(aten, name) for name in _FUNCTIONAL))(_functional)


@ATEN_REWRITES.register(aten.gelu)
def _gelu(ctx: Context, node: fx.Node, a: dict) -> Any:
    approximate = a.get("approximate", "none")
    return insert_call(node, F.gelu, (a["self"],), None if approximate == "none" else {"approximate": approximate})


@ATEN_REWRITES.register(aten.prelu, aten._prelu_kernel)
def _prelu(ctx: Context, node: fx.Node, a: dict) -> Any:
    # prelu(x, <PReLU module>.weight) -> the PReLU module; otherwise F.prelu(x, w)
    w = a["weight"]
    if isinstance(w, fx.Node) and w.op == "get_attr" and w.target.endswith(".weight"):
        owner = w.target.rpartition(".")[0]
        try:
            module = ctx.root.get_submodule(owner)
        except AttributeError:
            module = None
        if type(module) is nn.PReLU:
            with ctx.graph.inserting_before(node):
                new = ctx.graph.call_module(owner, (a["self"],))
            new.meta = dict(node.meta)
            return new
    return insert_call(node, F.prelu, (a["self"], w))


@ATEN_REWRITES.register(aten.mean)
def _mean(ctx: Context, node: fx.Node, a: dict) -> Any:
    # mean.dim(x, dims, keepdim) -> x.mean(dims, keepdim)
    if node.target._overloadname != "dim" or a.get("dtype") is not None or not is_tensor(node):
        return KEEP
    with ctx.graph.inserting_before(node):
        new = ctx.graph.call_method("mean", (a["self"], _tuple(a["dim"]), bool(a["keepdim"])))
    new.meta = dict(node.meta)
    return new


@ATEN_REWRITES.register(aten.view, aten._unsafe_view, aten.reshape, aten.flatten)
def _flatten(ctx: Context, node: fx.Node, a: dict) -> Any:
    # view(x, [N, C*H*W]) with N = x.shape[0] -> torch.flatten(x, 1) (what x.flatten(1) became);
    # flatten.using_ints(x, 1) where the program was not decomposed (see in_place.py) likewise
    x, val = a["self"], node.meta.get("val")
    xval = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not (isinstance(val, torch.Tensor) and isinstance(xval, torch.Tensor)) or val.dim() != 2 or xval.dim() < 2:
        return KEEP
    if not same_size(val.shape[0], xval.shape[0]) or not all(is_concrete(s) for s in xval.shape[1:]):
        return KEEP
    rest = 1
    for s in xval.shape[1:]:
        rest *= int(s)
    if not is_concrete(val.shape[1]) or int(val.shape[1]) != rest:
        return KEEP
    return insert_call(node, torch.flatten, (x, 1))


def map_ops(ctx: Context) -> None:
    """Rewrite every ATen op of ``ctx.graph`` that has a rule."""
    ctx.tensors = input_dependent(ctx.graph)
    for node in list(ctx.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        rewrite = ATEN_REWRITES.for_function(node.target)
        if rewrite is None:
            continue
        new = rewrite(ctx, node, bind_schema(node))
        if apply(node, new) and (node in ctx.tensors or isinstance(new, fx.Node) and new in ctx.tensors):
            ctx.tensors.add(new)
