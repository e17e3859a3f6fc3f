"""Canonicalize a traced graph: one form per op, no-ops removed.

After this pass every later stage sees only these forms:

the canonical op set of :mod:`repq_fx.ir` (its table; one typed view per op there).

Sizes read from parameters (``self.weight.shape[-1] // 2``) become constants. A linear on
channels-last pixels moved to channels-first and followed by a BatchNorm becomes the 1x1 conv it is.
Removed: ``nn.Identity``, dropout with p=0 or ``training=False``, DropPath at rate 0,
``add(0, x)``, ``mul(x, 1)`` and ``torch._assert`` checks of ``x.ndim``/``x.shape`` (other
asserts, such as FX's ``concrete_args`` guards, stay). Each rewrite is one
entry in a rule table (:class:`repq_fx.ir.RuleTable`, keyed by module class, function or method name),
so supporting a new spelling is one registration.

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

from ..ir import (ERASED, KEEP, ArithView, AvgPoolView, CatView, ConvView, PadView, RuleTable, apply, batch_norm,
                  conv_module_refusal, conv_padding, fetch_attr, finish_pass, free_module_path, insert_call,
                  is_batch_norm, module_refusal)
from .channels_last import CHANNELS_FIRST_FOR_LINEAR, linear_then_batch_norm
from .parameter_sizes import fold_parameter_sizes
from .tracer import STOCHASTIC_DEPTH

Rewrite = Callable[[fx.GraphModule, fx.Node], Any]  # the replacement, KEEP or ERASED (repq_fx.ir.rules)
REWRITES: RuleTable[Rewrite] = RuleTable("FX canonical rewrite")


def _normalized(node: fx.Node, target: Any, args: tuple) -> Any:
    """``target(*args)`` in place of ``node``, or KEEP if ``node`` already is exactly that."""
    if node.target is target and args == tuple(node.args) and not node.kwargs:
        return KEEP
    return insert_call(node, target, args)


def _get_attrs(gm: fx.GraphModule, node: fx.Node, module: nn.Module, *names: str) -> list[fx.Node | None]:
    """``get_attr`` nodes of the called module's ``names`` (None for a parameter the module does not have)."""
    with gm.graph.inserting_before(node):
        return [gm.graph.get_attr(f"{node.target}.{n}") if getattr(module, n) is not None else None for n in names]


# -- modules ------------------------------------------------------------------------------------

@REWRITES.register(nn.Identity)
def _drop_module(gm: fx.GraphModule, node: fx.Node) -> Any:
    # x -> x
    return node.args[0]


@REWRITES.register(nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
def _dropout_module(gm: fx.GraphModule, node: fx.Node) -> Any:
    # dropout(p=0)(x) -> x
    return node.args[0] if gm.get_submodule(node.target).p == 0 else KEEP


@REWRITES.register(nn.Conv2d)
def _conv_module(gm: fx.GraphModule, node: fx.Node) -> Any:
    # Conv2d(x) -> F.conv2d(x, self.weight, self.bias, ...)
    conv = gm.get_submodule(node.target)
    if conv_module_refusal(conv):
        return KEEP
    padding = conv_padding(conv.padding, conv.weight.shape, conv.dilation)
    w, b = _get_attrs(gm, node, conv, "weight", "bias")
    return insert_call(node, F.conv2d, ConvView(node.args[0], w, b, conv.stride, padding, conv.dilation,
                                                conv.groups).args())


@REWRITES.register(nn.Linear)
def _linear_module(gm: fx.GraphModule, node: fx.Node) -> Any:
    # Linear(x) -> F.linear(x, self.weight, self.bias)
    lin = gm.get_submodule(node.target)
    if type(lin).forward is not nn.Linear.forward:
        return KEEP
    return insert_call(node, F.linear, (node.args[0], *_get_attrs(gm, node, lin, "weight", "bias")))


@REWRITES.register(nn.AvgPool2d)
def _avgpool_module(gm: fx.GraphModule, node: fx.Node) -> Any:
    # AvgPool2d(x) -> F.avg_pool2d(x, ...)
    p = gm.get_submodule(node.target)
    view = AvgPoolView(node.args[0], p.kernel_size, p.stride, p.padding, p.ceil_mode, p.count_include_pad,
                       p.divisor_override)
    return insert_call(node, F.avg_pool2d, view.args())


@REWRITES.register(nn.ZeroPad2d, nn.ConstantPad2d)
def _pad_module(gm: fx.GraphModule, node: fx.Node) -> Any:
    # ZeroPad2d(x) -> F.pad(x, pads, "constant", value)
    p = gm.get_submodule(node.target)
    return insert_call(node, F.pad, PadView(node.args[0], tuple(p.padding), "constant", float(p.value)).args())


@REWRITES.register(nn.modules.batchnorm._BatchNorm)
def _norm_module(gm: fx.GraphModule, node: fx.Node) -> Any:
    # BN(x) -> batch_norm(x, self.bn); BatchNormAct2d(x) -> act(drop(batch_norm(x, self.bn)))
    with gm.graph.inserting_before(node):
        module_ref = gm.graph.get_attr(node.target)
    out = insert_call(node, batch_norm, (node.args[0], module_ref))
    module = gm.get_submodule(node.target)
    for child in ("drop", "act"):
        sub = getattr(module, child, None)
        if isinstance(sub, nn.Module) and not isinstance(sub, nn.Identity):
            with gm.graph.inserting_before(node):
                out = gm.graph.call_module(f"{node.target}.{child}", (out,))
    return out


# -- functions ----------------------------------------------------------------------------------

@REWRITES.register(F.conv2d, torch.conv2d)
def _conv_function(gm: fx.GraphModule, node: fx.Node) -> Any:
    # torch.conv2d(...) / keyword args -> F.conv2d(x, w, b, stride, padding, dilation, groups)
    view = ConvView.of(node)
    w = view.weight
    if isinstance(view.padding, str) and isinstance(w, fx.Node) and w.op == "get_attr":  # else the shape is unknown
        padding = conv_padding(view.padding, fetch_attr(gm, w.target).shape, view.dilation)
        if padding is not None:  # None: 'same' with an even kernel (asymmetric) stays a string
            view = ConvView(view.x, w, view.bias, view.stride, padding, view.dilation, view.groups)
    return _normalized(node, F.conv2d, view.args())


@REWRITES.register(F.avg_pool2d)
def _avgpool_function(gm: fx.GraphModule, node: fx.Node) -> Any:
    # avg_pool2d(x, k, ...) with keyword args -> all positional
    return _normalized(node, F.avg_pool2d, AvgPoolView.of(node).args())


@REWRITES.register(F.pad)
def _pad_function(gm: fx.GraphModule, node: fx.Node) -> Any:
    # F.pad(x, pads, mode, value) -> all positional, value a float
    v = PadView.of(node)
    pads = tuple(v.pad) if isinstance(v.pad, list) else v.pad
    return _normalized(node, F.pad, PadView(v.x, pads, v.mode, 0.0 if v.value is None else v.value).args())


@REWRITES.register(F.dropout, F.dropout2d, torch.dropout)
def _dropout_function(gm: fx.GraphModule, node: fx.Node) -> Any:
    # dropout(x, p=0) -> x ; dropout(x, training=False) -> x
    a = dict(zip(("input", "p", "training", "inplace"), node.args), **node.kwargs)
    p, training = a.get("p", 0.5), a.get("training", True)
    if p == 0 or training is False:
        return a["input"]
    if training is True and node.target is F.dropout:
        # training=self.training was baked in at trace time: a Dropout module follows .train()/.eval()
        name = free_module_path(gm, f"{node.name}_module")
        gm.add_submodule(name, nn.Dropout(p))
        with gm.graph.inserting_before(node):
            return gm.graph.call_module(name, (a["input"],))
    return KEEP


@REWRITES.register(F.batch_norm)
def _batch_norm_function(gm: fx.GraphModule, node: fx.Node) -> Any:
    # F.batch_norm(x, m.running_mean, ...) traced through module m -> batch_norm(x, m)
    a = dict(zip(("input", "running_mean", "running_var"), node.args), **node.kwargs)
    owners = {arg.target.rpartition(".")[0] for arg in (a.get("running_mean"), a.get("running_var"))
              if isinstance(arg, fx.Node) and arg.op == "get_attr"}
    if len(owners) != 1:
        return KEEP
    owner = owners.pop()
    try:
        module = gm.get_submodule(owner)
    except AttributeError:
        return KEEP
    if not is_batch_norm(module):
        return KEEP
    with gm.graph.inserting_before(node):
        module_ref = gm.graph.get_attr(owner)
    return insert_call(node, batch_norm, (a["input"], module_ref))


@REWRITES.register(torch._assert)
def _drop_assert(gm: fx.GraphModule, node: fx.Node) -> Any:
    # torch._assert(x.ndim == 4, msg) -> (removed); other asserts (concrete_args guards) stay
    if _is_shape_check(node.args[0]):
        gm.graph.erase_node(node)
        return ERASED
    return KEEP


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


@REWRITES.register(torch.cat, torch.concat, torch.concatenate)
def _cat_function(gm: fx.GraphModule, node: fx.Node) -> Any:
    # torch.concat(xs, dim=d) -> torch.cat(xs, d); a sequence computed at run time (x.chunk(2)) stays a node
    v = CatView.of(node)
    tensors = list(v.tensors) if isinstance(v.tensors, (list, tuple)) else v.tensors
    return _normalized(node, torch.cat, (tensors, v.dim))


_ARITH = {
    operator.add: (operator.add, torch.add, operator.iadd, "add", "add_"),
    operator.sub: (operator.sub, torch.sub, torch.subtract, operator.isub, "sub", "sub_"),
    operator.mul: (operator.mul, torch.mul, torch.multiply, operator.imul, "mul", "mul_"),
    operator.truediv: (operator.truediv, torch.div, torch.true_divide, operator.itruediv, "div", "div_"),
}


def _arith_rule(op: Any) -> Rewrite:
    def rewrite(gm: fx.GraphModule, node: fx.Node) -> Any:
        # x.add_(y) -> operator.add(x, y), only where no one else sees the mutation
        if node.op == "call_method" and node.target.endswith("_"):
            self_arg = node.args[0]
            if not isinstance(self_arg, fx.Node) or len(self_arg.users) > 1:
                return KEEP
        return _arith(gm, node, op)
    return rewrite


for _op, _keys in _ARITH.items():
    REWRITES.register(*_keys)(_arith_rule(_op))


def _arith(gm: fx.GraphModule, node: fx.Node, op: Any) -> Any:
    # add(0, x), add(x, 0), mul(x, 1), div(x, 1) -> x; add(x, y, alpha=k) -> x + y * k; torch.add -> operator.add
    if len(node.args) != 2 or (node.kwargs and set(node.kwargs) - {"alpha"}):
        return KEEP
    alpha = node.kwargs.get("alpha", 1)
    a, b = ArithView.of(node).args()
    neutral = _neutral(op, a, b) if alpha == 1 else None
    if neutral is not None:
        return neutral
    if alpha != 1:
        if op not in (operator.add, operator.sub):
            return KEEP
        with gm.graph.inserting_before(node):
            b = gm.graph.call_function(operator.mul, (b, alpha))
    if op is node.target and (a, b) == node.args and not node.kwargs:
        return KEEP
    return insert_call(node, op, (a, b))


def _neutral(op: Any, a: Any, b: Any) -> Any:
    """The operand that ``a op b`` equals when the other is the neutral number (None if neither is)."""
    number = (lambda v, n: isinstance(v, (int, float)) and not isinstance(v, bool) and v == n)
    if op is operator.add and number(a, 0):
        return b
    if op in (operator.add, operator.sub) and number(b, 0):
        return a
    if op in (operator.mul, operator.truediv) and number(b, 1):
        return a
    if op is operator.mul and number(a, 1):
        return b
    return None


# -- driver -------------------------------------------------------------------------------------

def _rewrite_for(gm: fx.GraphModule, node: fx.Node) -> Rewrite | None:
    if node.op != "call_module":
        return REWRITES.lookup(node)
    module = gm.get_submodule(node.target)
    if module_refusal(module):
        return None  # hooks or parametrizations: only the module call itself keeps them
    rewrite = REWRITES.for_module(module)
    if rewrite is None and _is_inert_drop_path(module):
        return _drop_module
    return rewrite


def _is_inert_drop_path(module: nn.Module) -> bool:
    """timm DropPath / StochasticDepth at rate 0 is the identity."""
    if type(module).__name__ not in STOCHASTIC_DEPTH:
        return False
    return getattr(module, "drop_prob", getattr(module, "p", None)) == 0


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm`` in place into the canonical forms above and return it."""
    fold_parameter_sizes(gm)
    for node in list(gm.graph.nodes):
        rewrite = _rewrite_for(gm, node)
        if rewrite is not None:
            apply(node, rewrite(gm, node))
    linear_then_batch_norm(gm)
    return finish_pass(gm, unused_submodules=False)


__all__ = ["canonicalize", "REWRITES", "CHANNELS_FIRST_FOR_LINEAR"]
