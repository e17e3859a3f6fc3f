"""Canonicalize a traced graph: one form per op, no-ops removed.

After this pass every later stage sees only these forms:

==========================  ==========================================================
op                          canonical node
==========================  ==========================================================
conv                        ``F.conv2d(x, w, b, stride, padding, dilation, groups)``
BatchNorm (any form)        ``norm.batch_norm(x, <get_attr of the BN module>)``
avg-pool                    ``F.avg_pool2d(x, k, s, p, ceil_mode, count_include_pad, div)``
pad                         ``F.pad(x, pads, "constant", value)``
add / sub / mul / div       ``operator.add`` / ``sub`` / ``mul`` / ``truediv``
cat                         ``torch.cat(tensors, dim)``
==========================  ==========================================================

Sizes read from parameters (``self.weight.shape[-1] // 2``) become constants. A linear on
channels-last pixels moved to channels-first and followed by a BatchNorm becomes the 1x1 conv it is.
Removed: ``nn.Identity``, dropout with p=0 or ``training=False``, DropPath at rate 0,
``add(0, x)``, ``mul(x, 1)`` and ``torch._assert`` checks of ``x.ndim``/``x.shape`` (other
asserts, such as FX's ``concrete_args`` guards, stay). Each rewrite is one
entry in a table keyed by the node's target, so supporting a new spelling is one line.

>>> import torch.nn as nn
>>> from repq_fx.capture.tracer import trace
>>> gm = canonicalize(trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Identity(), nn.BatchNorm2d(8))))
>>> [getattr(n.target, "__name__", n.target) for n in gm.graph.nodes if n.op == "call_function"]
['conv2d', 'batch_norm']
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .graph_utils import fetch_attr, finish_pass, free_module_path, is_size_value
from .norm import batch_norm, is_batch_norm
from .tracer import STOCHASTIC_DEPTH

Rewrite = Callable[[fx.GraphModule, fx.Node], "fx.Node | None"]
_MODULE_REWRITES: dict[type, Rewrite] = {}
_FUNCTION_REWRITES: dict[Any, Rewrite] = {}
_METHOD_REWRITES: dict[str, Rewrite] = {}

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_POOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None}
_PAD_ARGS = ("input", "pad", "mode", "value")
_PAD_DEFAULTS = {"mode": "constant", "value": None}


def _register(table: dict, *keys: Any) -> Callable[[Rewrite], Rewrite]:
    def deco(fn: Rewrite) -> Rewrite:
        for k in keys:
            table[k] = fn
        return fn
    return deco


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """Positional + keyword arguments of ``node`` by parameter name."""
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _replace(gm: fx.GraphModule, node: fx.Node, target: Any, args: tuple) -> fx.Node:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    new.meta = dict(node.meta)
    return new


def _normalized(gm: fx.GraphModule, node: fx.Node, target: Any, args: tuple) -> fx.Node | None:
    """``target(*args)`` in place of ``node``, or None if ``node`` already is exactly that."""
    if node.target is target and args == tuple(node.args) and not node.kwargs:
        return None
    return _replace(gm, node, target, args)


def _conv_padding(padding: Any, weight_shape: torch.Size | tuple[int, ...], dilation: Any) -> Any:
    if padding == "valid":
        return 0
    if padding == "same":  # odd kernels only; even kernels pad asymmetrically in torch
        d = dilation if isinstance(dilation, (tuple, list)) else (dilation, dilation)
        total = [di * (k - 1) for di, k in zip(d, weight_shape[2:])]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return padding


# -- modules ------------------------------------------------------------------------------------

@_register(_MODULE_REWRITES, nn.Identity)
def _drop_module(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # x -> x
    return node.args[0]


@_register(_MODULE_REWRITES, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
def _dropout_module(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # dropout(p=0)(x) -> x
    return node.args[0] if gm.get_submodule(node.target).p == 0 else None


@_register(_MODULE_REWRITES, nn.Conv2d)
def _conv_module(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # Conv2d(x) -> F.conv2d(x, self.weight, self.bias, ...)
    conv = gm.get_submodule(node.target)
    if conv_module_refusal(conv):
        return None
    padding = _conv_padding(conv.padding, conv.weight.shape, conv.dilation)
    with gm.graph.inserting_before(node):
        w = gm.graph.get_attr(f"{node.target}.weight")
        b = gm.graph.get_attr(f"{node.target}.bias") if conv.bias is not None else None
    return _replace(gm, node, F.conv2d, (node.args[0], w, b, conv.stride, padding, conv.dilation, conv.groups))


def module_refusal(module: nn.Module) -> str:
    """Why any module must stay an opaque ``call_module`` ("" if it may be rewritten).

    A rewrite replaces the module call by functional ops on its parameters, which would drop its
    hooks (the deprecated ``weight_norm`` is one) and read a parametrized weight outside
    ``torch.nn.utils.parametrize`` (``spectral_norm`` runs a power iteration on every read in train mode).
    """
    kinds = [kind for kind, hooks in (("forward", module._forward_hooks), ("forward pre", module._forward_pre_hooks),
                                      ("backward", module._backward_hooks),
                                      ("backward pre", module._backward_pre_hooks)) if hooks]
    if kinds:
        return (f"{type(module).__name__} has hooks ({', '.join(kinds)}); merging would drop them, so it is "
                "left as it is (remove the hooks to merge it)")
    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        return (f"{type(module).__name__} is parametrized ({names}: torch.nn.utils.parametrize, e.g. weight_norm, "
                "spectral_norm); left as it is (torch.nn.utils.parametrize.remove_parametrizations(module, "
                "name) first merges it)")
    return ""


def conv_module_refusal(conv: nn.Module) -> str:
    """Why a conv module stays opaque ("" if it becomes a canonical conv)."""
    refusal = module_refusal(conv)
    if refusal:
        return refusal
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return f"{type(conv).__name__}: a transposed convolution is not merged (only Conv2d); left as it is"
    if isinstance(conv, nn.modules.conv._ConvNd) and not isinstance(conv, nn.Conv2d):
        return (f"{type(conv).__name__}: only 2-d convolutions are merged and quantized; left as it is, in float")
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} overrides Conv2d.forward; register a rule or make it traceable"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: only zero padding can be merged (a conv cannot fold its borders)"
    if _conv_padding(conv.padding, conv.weight.shape, conv.dilation) is None:
        return "padding='same' with an even kernel pads asymmetrically; left as it is"
    return ""


@_register(_MODULE_REWRITES, nn.AvgPool2d)
def _avgpool_module(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # AvgPool2d(x) -> F.avg_pool2d(x, ...)
    p = gm.get_submodule(node.target)
    args = (node.args[0], p.kernel_size, p.stride, p.padding, p.ceil_mode, p.count_include_pad, p.divisor_override)
    return _replace(gm, node, F.avg_pool2d, args)


@_register(_MODULE_REWRITES, nn.ZeroPad2d, nn.ConstantPad2d)
def _pad_module(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # ZeroPad2d(x) -> F.pad(x, pads, "constant", value)
    p = gm.get_submodule(node.target)
    return _replace(gm, node, F.pad, (node.args[0], tuple(p.padding), "constant", float(p.value)))


def _norm_module(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # BN(x) -> batch_norm(x, self.bn); BatchNormAct2d(x) -> act(drop(batch_norm(x, self.bn)))
    with gm.graph.inserting_before(node):
        module_ref = gm.graph.get_attr(node.target)
    out = _replace(gm, node, batch_norm, (node.args[0], module_ref))
    module = gm.get_submodule(node.target)
    for child in ("drop", "act"):
        sub = getattr(module, child, None)
        if isinstance(sub, nn.Module) and not isinstance(sub, nn.Identity):
            with gm.graph.inserting_before(node):
                out = gm.graph.call_module(f"{node.target}.{child}", (out,))
    return out


# -- functions ----------------------------------------------------------------------------------

@_register(_FUNCTION_REWRITES, F.conv2d, torch.conv2d)
def _conv_function(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # torch.conv2d(...) / keyword args -> F.conv2d(x, w, b, stride, padding, dilation, groups)
    a = _bind(node, _CONV_ARGS, _CONV_DEFAULTS)
    if isinstance(a["padding"], str):
        w = a["weight"]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return _normalized(gm, node, F.conv2d, tuple(a[k] for k in _CONV_ARGS))  # shape unknown here
        padding = _conv_padding(a["padding"], fetch_attr(gm, w.target).shape, a["dilation"])
        if padding is None:  # 'same' with an even kernel: asymmetric
            return _normalized(gm, node, F.conv2d, tuple(a[k] for k in _CONV_ARGS))
        a["padding"] = padding
    return _normalized(gm, node, F.conv2d, tuple(a[k] for k in _CONV_ARGS))


@_register(_FUNCTION_REWRITES, F.avg_pool2d)
def _avgpool_function(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # avg_pool2d(x, k, ...) with keyword args -> all positional
    a = _bind(node, _POOL_ARGS, _POOL_DEFAULTS)
    return _normalized(gm, node, F.avg_pool2d, tuple(a[k] for k in _POOL_ARGS))


@_register(_FUNCTION_REWRITES, F.pad)
def _pad_function(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # F.pad(x, pads, mode, value) -> all positional, value a float
    a = _bind(node, _PAD_ARGS, _PAD_DEFAULTS)
    value = 0.0 if a["value"] is None else a["value"]
    args = (a["input"], tuple(a["pad"]) if isinstance(a["pad"], list) else a["pad"], a["mode"], value)
    return _normalized(gm, node, F.pad, args)


@_register(_FUNCTION_REWRITES, F.dropout, F.dropout2d, torch.dropout)
def _dropout_function(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # dropout(x, p=0) -> x ; dropout(x, training=False) -> x
    a = _bind(node, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
    if a["p"] == 0 or a["training"] is False:
        return a["input"]
    if a["training"] is True and node.target is F.dropout:
        # training=self.training was baked in at trace time: a Dropout module follows .train()/.eval()
        name = free_module_path(gm, f"{node.name}_module")
        gm.add_submodule(name, nn.Dropout(a["p"]))
        with gm.graph.inserting_before(node):
            return gm.graph.call_module(name, (a["input"],))
    return None


@_register(_MODULE_REWRITES, nn.Linear)
def _linear_module(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # Linear(x) -> F.linear(x, self.weight, self.bias)
    lin = gm.get_submodule(node.target)
    if type(lin).forward is not nn.Linear.forward:
        return None
    with gm.graph.inserting_before(node):
        w = gm.graph.get_attr(f"{node.target}.weight")
        b = gm.graph.get_attr(f"{node.target}.bias") if lin.bias is not None else None
    return _replace(gm, node, F.linear, (node.args[0], w, b))


@_register(_FUNCTION_REWRITES, F.batch_norm)
def _batch_norm_function(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # F.batch_norm(x, m.running_mean, ...) traced through module m -> batch_norm(x, m)
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    a = _bind(node, names, {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
    owners = {arg.target.rpartition(".")[0] for arg in (a["running_mean"], a["running_var"])
              if isinstance(arg, fx.Node) and arg.op == "get_attr"}
    if len(owners) != 1:
        return None
    owner = owners.pop()
    try:
        module = gm.get_submodule(owner)
    except AttributeError:
        return None
    if not is_batch_norm(module):
        return None
    with gm.graph.inserting_before(node):
        module_ref = gm.graph.get_attr(owner)
    return _replace(gm, node, batch_norm, (a["input"], module_ref))


@_register(_FUNCTION_REWRITES, torch._assert)
def _drop_assert(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # torch._assert(x.ndim == 4, msg) -> (removed); other asserts (concrete_args guards) stay
    if _is_shape_check(node.args[0]):
        gm.graph.erase_node(node)
    return None


def _is_shape_check(cond: Any, depth: int = 4) -> bool:
    """A condition computed from ``x.ndim`` / ``x.shape`` / ``x.dim()`` / ``x.size()`` only (timm's dead checks)."""
    if not isinstance(cond, fx.Node) or depth == 0:
        return False
    if cond.op == "call_function" and cond.target is getattr and cond.args[1] in ("ndim", "shape"):
        return True
    if cond.op == "call_method" and cond.target in ("dim", "size"):
        return True
    inputs = cond.all_input_nodes
    return bool(inputs) and cond.op == "call_function" and all(_is_shape_check(i, depth - 1) for i in inputs)


@_register(_FUNCTION_REWRITES, torch.cat, torch.concat, torch.concatenate)
def _cat_function(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    # torch.concat(xs, dim=d) -> torch.cat(xs, d); a sequence computed at run time (x.chunk(2)) stays a node
    a = _bind(node, ("tensors", "dim"), {"dim": 0})
    tensors = list(a["tensors"]) if isinstance(a["tensors"], (list, tuple)) else a["tensors"]
    return _normalized(gm, node, torch.cat, (tensors, a["dim"]))


_ARITH = {
    operator.add: operator.add, torch.add: operator.add, operator.iadd: operator.add,
    operator.sub: operator.sub, torch.sub: operator.sub, torch.subtract: operator.sub, operator.isub: operator.sub,
    operator.mul: operator.mul, torch.mul: operator.mul, torch.multiply: operator.mul, operator.imul: operator.mul,
    operator.truediv: operator.truediv, torch.div: operator.truediv, torch.true_divide: operator.truediv,
    operator.itruediv: operator.truediv,
}
_METHOD_ARITH = {
    "add": operator.add, "add_": operator.add, "sub": operator.sub, "sub_": operator.sub,
    "mul": operator.mul, "mul_": operator.mul, "div": operator.truediv, "div_": operator.truediv,
}


def _arith(gm: fx.GraphModule, node: fx.Node, op: Any) -> fx.Node | None:
    if len(node.args) != 2 or (node.kwargs and set(node.kwargs) - {"alpha"}):
        return None
    alpha = node.kwargs.get("alpha", 1)
    a, b = node.args
    if op is operator.add and alpha == 1 and _is_zero(a):
        return b  # add(0, x) -> x
    if op in (operator.add, operator.sub) and alpha == 1 and _is_zero(b):
        return a  # add(x, 0) -> x
    if op in (operator.mul, operator.truediv) and _is_one(b):
        return a  # mul(x, 1) -> x
    if op is operator.mul and _is_one(a):
        return b
    if alpha != 1:
        if op not in (operator.add, operator.sub):
            return None
        with gm.graph.inserting_before(node):
            b = gm.graph.call_function(operator.mul, (b, alpha))
    if op is node.target and (a, b) == node.args and not node.kwargs:
        return None
    return _replace(gm, node, op, (a, b))


def _is_zero(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


def _is_one(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 1


for _target, _op in _ARITH.items():
    _FUNCTION_REWRITES[_target] = (lambda op: lambda gm, node: _arith(gm, node, op))(_op)
for _name, _op in _METHOD_ARITH.items():
    _METHOD_REWRITES[_name] = (lambda op: lambda gm, node: _method_arith(gm, node, op))(_op)


def _method_arith(gm: fx.GraphModule, node: fx.Node, op: Any) -> fx.Node | None:
    # x.add_(y) -> operator.add(x, y), only where no one else sees the mutation
    if node.target.endswith("_"):
        self_arg = node.args[0]
        if not isinstance(self_arg, fx.Node) or len(self_arg.users) > 1:
            return None
    return _arith(gm, node, op)


# -- driver -------------------------------------------------------------------------------------

def _rewrite_for(gm: fx.GraphModule, node: fx.Node) -> Rewrite | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if module_refusal(module):
            return None  # hooks or parametrizations: only the module call itself keeps them
        if is_batch_norm(module):
            return _norm_module
        for cls in type(module).__mro__:
            if cls in _MODULE_REWRITES:
                return _MODULE_REWRITES[cls]
        if _is_inert_drop_path(module):
            return _drop_module
        return None
    if node.op == "call_function":
        try:
            return _FUNCTION_REWRITES.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_REWRITES.get(node.target)
    return None


def _is_inert_drop_path(module: nn.Module) -> bool:
    """timm DropPath / StochasticDepth at rate 0 is the identity."""
    name = type(module).__name__
    if name not in STOCHASTIC_DEPTH:
        return False
    rate = getattr(module, "drop_prob", getattr(module, "p", None))
    return rate == 0


def _fold_parameter_sizes(gm: fx.GraphModule) -> None:
    """Sizes read from parameters and buffers (``padding=self.weight.shape[-1] // 2``) become constants.

    A tensor's shape never changes while it trains, so the size is part of the model's structure;
    sizes read from the input (``x.size(3)``) stay nodes (the linear-op rules refuse them).
    """
    depends_on_input: set[fx.Node] = set()
    foldable: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in depends_on_input for a in node.all_input_nodes):
            depends_on_input.add(node)
        elif is_size_value(node) and node.op in ("call_function", "call_method"):
            foldable.append(node)
    values: dict[fx.Node, Any] = {}

    def value_of(n: fx.Node) -> Any:
        return values[n] if n in values else fetch_attr(gm, n.target)

    for node in foldable:
        args = fx.node.map_arg(node.args, value_of)
        kwargs = fx.node.map_arg(node.kwargs, value_of)
        if node.op == "call_method":
            values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            values[node] = node.target(*args, **kwargs)
        if isinstance(values[node], torch.Size):
            values[node] = tuple(values[node])
    for node in reversed(foldable):
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: values[node] if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: values[node] if n is node else n)
        gm.graph.erase_node(node)


_TO_CHANNELS_FIRST = (0, 3, 1, 2)
CHANNELS_FIRST_FOR_LINEAR = "repq_channels_first_for_linear"  # meta of the permute _linear_then_batch_norm adds


def _channels_first_of(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` moves from channels-last to channels-first (``x.permute(0, 3, 1, 2)``,
    ``torch.permute``, ``x.movedim(-1, 1)``), or None."""
    if node.op not in ("call_method", "call_function") or not node.args:
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_function" and node.target not in (torch.permute, torch.movedim):
        return None
    rest = list(node.args[1:]) + list(node.kwargs.values())
    if name == "permute":
        dims = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)
        if all(isinstance(d, int) for d in dims) and tuple(d % 4 for d in dims) == _TO_CHANNELS_FIRST:
            return node.args[0]
    elif name == "movedim" and len(rest) == 2 and all(isinstance(d, int) for d in rest):
        if rest[0] % 4 == 3 and rest[1] % 4 == 1:
            return node.args[0]
    return None


def _linear_then_batch_norm(gm: fx.GraphModule) -> None:
    """``bn(linear(x, W, b).permute(0, 3, 1, 2))`` -> ``bn(conv2d(x.permute(0, 3, 1, 2), W[:, :, None, None], b))``.

    A linear on channels-last pixels, moved to channels-first, is a 1x1 conv of the moved input
    (ConvNeXt-style MLPs; UniRepLKNet's ``pwconv2``). Written as a conv, the BatchNorm that follows
    folds into it like into any conv (UniRepLKNet's own ``reparameterize`` folds it into the linear).
    Only where a BatchNorm follows: other linears stay linears.
    """
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target is not batch_norm:
            continue
        moved = bn.args[0]
        linear = _channels_first_of(moved) if isinstance(moved, fx.Node) else None
        if not (isinstance(linear, fx.Node) and linear.op == "call_function" and linear.target is F.linear
                and len(linear.users) == 1 and len(linear.args) == 3 and not linear.kwargs):
            continue
        x, weight, bias = linear.args
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or fetch_attr(gm, weight.target).dim() != 2:
            continue
        with gm.graph.inserting_before(moved):
            x_first = gm.graph.call_method("permute", (x, *_TO_CHANNELS_FIRST))
            x_first.meta[CHANNELS_FIRST_FOR_LINEAR] = True  # merge writes a merged 1x1 here back as a linear
            kernel = gm.graph.call_method("reshape", (weight, (*fetch_attr(gm, weight.target).shape, 1, 1)))
            conv = gm.graph.call_function(F.conv2d, (x_first, kernel, bias, 1, 0, 1, 1))
        conv.meta = {**moved.meta, "repq_linear": weight.target.rpartition(".")[0]}  # explain names it a linear
        moved.replace_all_uses_with(conv)
        gm.graph.erase_node(moved)
        gm.graph.erase_node(linear)


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm`` in place into the canonical forms above and return it."""
    _fold_parameter_sizes(gm)
    for node in list(gm.graph.nodes):
        rewrite = _rewrite_for(gm, node)
        if rewrite is None:
            continue
        replacement = rewrite(gm, node)
        if node.target is torch._assert or replacement is None or replacement is node:
            continue
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    _linear_then_batch_norm(gm)
    return finish_pass(gm, unused_submodules=False)

