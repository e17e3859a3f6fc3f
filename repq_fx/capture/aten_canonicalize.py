"""Canonicalize a torch.export program (functional ATen IR) into repq_fx's canonical graph.

The result is the graph the FX front end produces, so ``find_blocks``, ``merge_blocks`` and
``prepare_graph`` run unchanged:

==================================================  =============================================
ATen (after ``run_decompositions({})``)             canonical node
==================================================  =============================================
parameter / buffer / constant placeholders          ``get_attr`` with the module path of the model
``conv2d`` / ``convolution`` (2-D, not transposed)  ``F.conv2d(x, w, b, stride, padding, dilation, groups)``
``_native_batch_norm_legit*`` / ``batch_norm`` ...  ``norm.batch_norm(x, <get_attr of the BN module>)``
  (their running-statistic outputs)                 ``get_attr`` of the buffers (updated in place)
``add`` / ``sub`` / ``rsub`` / ``mul`` / ``div``    ``operator.add`` / ``sub`` / ``mul`` / ``truediv``
``neg``                                             ``operator.neg``
``cat``                                             ``torch.cat(tensors, dim)``
``pad`` / ``constant_pad_nd``                       ``F.pad(x, pads, mode, value)``
slice assignment of a per-channel border            ``F.pad(x - v, pads) + v`` (``slice_padding``)
``avg_pool2d``                                      ``F.avg_pool2d`` (all seven arguments)
``slice`` on H / W                                  ``x[:, :, a:b]`` (a crop)
``relu`` / ``linear``                               ``F.relu`` / ``F.linear``
``prelu`` of an ``nn.PReLU``'s weight               that ``PReLU`` module
``hardswish``, ``silu``, ``gelu``, ``hardtanh`` ... ``F.hardswish``, ... (``_FUNCTIONAL``)
``mean.dim`` / ``view(x, [N, -1])``                 ``x.mean(dims, keepdim)`` / ``torch.flatten(x, 1)``
``dropout`` / ``native_dropout`` (train, p > 0)     an ``nn.Dropout`` module (follows train/eval)
``clone`` of a tensor                               (removed)
asserts, ``_assert_tensor_metadata``, ...           (removed)
==================================================  =============================================

Other ATen ops stay as they are: they are functional, so the graph computes what the model
computes; the pipeline treats them as non-linear. What cannot be represented faithfully raises
:class:`UnsupportedOpError` naming the op and the node: a write to a buffer other than a
BatchNorm's statistics, a mutated input, a batch norm on tensors that are not one BatchNorm
module's own (its train/eval mode would be frozen), a random op in a train-mode capture
(it would stay on in eval mode).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._pytree import tree_unflatten

from ..errors import CaptureError, UnsupportedOpError
from .norm import batch_norm, is_batch_norm
from .graph_utils import finish_pass, size_function
from .slice_padding import SlicePadding, Sizes, bind, find_slice_paddings
from .tracer import LeafTracer

aten = torch.ops.aten
_INT_MAX = 2 ** 63 - 1


# -- integer (shape) arithmetic ------------------------------------------------------------------
# Export records size arithmetic as operator.add etc. on SymInts. The canonical graph keeps those
# targets for tensor arithmetic only, so size arithmetic gets names of its own.

@size_function
def size_add(a: Any, b: Any) -> Any:
    return a + b


@size_function
def size_sub(a: Any, b: Any) -> Any:
    return a - b


@size_function
def size_mul(a: Any, b: Any) -> Any:
    return a * b


@size_function
def size_floordiv(a: Any, b: Any) -> Any:
    return a // b


@size_function
def size_truediv(a: Any, b: Any) -> Any:
    return a / b


@size_function
def size_mod(a: Any, b: Any) -> Any:
    return a % b


@size_function
def size_neg(a: Any) -> Any:
    return -a


_SIZE_OPS = {operator.add: size_add, operator.sub: size_sub, operator.mul: size_mul,
             operator.floordiv: size_floordiv, operator.truediv: size_truediv, operator.mod: size_mod,
             operator.neg: size_neg}

_ASSERTS = {"_assert_scalar", "_assert_tensor_metadata", "sym_constrain_range", "sym_constrain_range_for_size",
            "_assert_async", "_functional_assert_async", "_functional_sym_constrain_range",
            "_functional_sym_constrain_range_for_size", "_assert_async.msg"}

_BN_PACKETS = {"_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
               "_native_batch_norm_legit", "_batch_norm_with_update_functional", "_batch_norm_with_update",
               "_batch_norm_no_update", "native_batch_norm", "batch_norm", "cudnn_batch_norm",
               "miopen_batch_norm", "_native_batch_norm_legit_no_stats"}


def _packet(target: Any) -> str:
    """``aten.add.Tensor`` -> ``"add"`` ("" for non-ATen targets)."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return target._schema.name.split("::")[-1]
    return ""


def _op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{_packet(t)}.{t._overloadname}"
    return getattr(t, "__name__", str(t))


def _where(node: fx.Node) -> str:
    """``node 'add_3' (in module 'stages.0')`` for messages."""
    stack = node.meta.get("nn_module_stack") or {}
    path = _module_path(list(stack.values())[-1][0]) if stack else ""
    return f"node {node.name!r}" + (f" (in module {path!r})" if path else "")


def _module_path(raw: str) -> str:
    """nn_module_stack paths: ``'L__self__.a.b'`` / ``'a.b@1'`` -> ``'a.b'``."""
    raw = raw.replace("L['self'].", "").replace("L__self__.", "")
    return ".".join(part.split("@")[0] for part in raw.split(".") if part and part != "L__self__")


def _is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


class _Context:
    def __init__(self, ep: Any, root: nn.Module, mode: str, sizes: list[Sizes]) -> None:
        self.ep, self.root, self.mode, self.sizes = ep, root, mode, sizes
        self.graph: fx.Graph = ep.graph_module.graph
        self.graph.owning_module = root  # get_attr targets resolve against the model's copy
        self.bn_paths: set[str] = set()
        self.tensors: set[fx.Node] = set()  # input-dependent nodes

    def free_attr(self, stem: str) -> str:
        name, i = stem, 1
        while hasattr(self.root, name):
            name, i = f"{stem}_{i}", i + 1
        return name


def canonicalize_exported(ep: Any, root: nn.Module, *, mode: str, sizes: list[Sizes], name: str) -> fx.GraphModule:
    """The canonical GraphModule of ``ep`` (functional ATen), rooted at ``root`` (the exported copy)."""
    ctx = _Context(ep, root, mode, sizes)
    user_outputs, mutations = _lift_placeholders_and_outputs(ctx)
    _set_output(ctx, user_outputs)
    _map_batch_norms(ctx)
    _check_mutations(ctx, mutations)
    _drop_asserts(ctx)
    _check_random_ops(ctx)
    _rewrite_slice_paddings(ctx)
    _map_ops(ctx)
    _rename_size_arithmetic(ctx)
    _follow_parameter_device(ctx)
    _check_mutable_ops(ctx)
    # torch.load re-traces a pickled GraphModule with its graph's tracer: the FX front end's, which
    # keeps repq_fx's own graph functions as calls (export's make_fx tracer cannot be rebuilt)
    ctx.graph._tracer_cls, ctx.graph._tracer_extras = LeafTracer, {}
    gm = fx.GraphModule(root, ctx.graph, name)
    return finish_pass(gm)


# -- signature ------------------------------------------------------------------------------------

def _lift_placeholders_and_outputs(ctx: _Context) -> tuple[list[Any], list[tuple[str, fx.Node]]]:
    """Parameters, buffers and constants become ``get_attr`` of their module paths."""
    graph, sig = ctx.graph, ctx.ep.graph_signature
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for node, spec in zip(placeholders, sig.input_specs):
        kind = spec.kind
        if kind == InputKind.USER_INPUT:
            if not _is_tensor(node):
                raise CaptureError(f"the export front end takes tensor inputs only; input {node.name!r} is "
                                   f"{type(node.meta.get('val')).__name__}")
            continue
        if kind in (InputKind.PARAMETER, InputKind.BUFFER):
            target = spec.target
        elif kind == InputKind.CONSTANT_TENSOR:
            target = _install_constant(ctx, spec.target, ctx.ep.constants[spec.target])
        else:
            raise CaptureError(f"torch.export input {node.name!r} of kind {kind.name} is not supported "
                               "(custom objects and effect tokens cannot be captured)")
        with graph.inserting_before(first_op):
            attr = graph.get_attr(target)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)

    output = next(n for n in graph.nodes if n.op == "output")
    values = list(output.args[0])
    user, mutations = [], []
    for value, spec in zip(values, sig.output_specs):
        if spec.kind == OutputKind.USER_OUTPUT:
            user.append(value)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            mutations.append((spec.target, value))
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            raise UnsupportedOpError(f"{_op_name(value)} at {_where(value)} writes into the model's input "
                                     f"{spec.target!r} in place; the canonical graph cannot mutate its inputs")
        else:
            raise UnsupportedOpError(f"torch.export output {getattr(value, 'name', value)!r} of kind "
                                     f"{spec.kind.name} is not supported")
    return user, mutations


def _install_constant(ctx: _Context, target: str, value: torch.Tensor) -> str:
    """A lifted tensor constant as a non-persistent buffer (it follows ``.to()``, state_dict keeps its names)."""
    prefix, _, field = target.rpartition(".")
    try:
        owner = ctx.root.get_submodule(prefix) if prefix else ctx.root
    except AttributeError:
        owner, field, prefix = ctx.root, ctx.free_attr("_export_constant"), ""
    if field in owner._buffers:
        return target
    if field in owner._parameters or (hasattr(owner, field) and not isinstance(getattr(owner, field), torch.Tensor)):
        owner, field, prefix = ctx.root, ctx.free_attr("_export_constant"), ""
    elif hasattr(owner, field):
        delattr(owner, field)
    owner.register_buffer(field, value, persistent=False)
    return f"{prefix}.{field}" if prefix else field


def _set_output(ctx: _Context, user_outputs: list[Any]) -> None:
    output = next(n for n in ctx.graph.nodes if n.op == "output")
    try:
        structure = tree_unflatten(user_outputs, ctx.ep.call_spec.out_spec)
    except Exception as e:  # custom pytree classes
        raise CaptureError(f"the model's output structure cannot be rebuilt in the captured graph: {e}") from e
    if not isinstance(structure, (fx.Node, tuple, list, dict)):
        raise CaptureError(f"the model returns a {type(structure).__name__}; the export front end supports "
                           "tensors and tuples/lists/dicts of them")
    output.args = (structure,)


def _check_mutations(ctx: _Context, mutations: list[tuple[str, fx.Node]]) -> None:
    for target, value in mutations:
        owner, _, field = target.rpartition(".")
        if owner in ctx.bn_paths and field in ("running_mean", "running_var", "num_batches_tracked"):
            continue  # the BatchNorm module updates them itself
        raise UnsupportedOpError(
            f"{_op_name(value)} at {_where(value)} writes the buffer {target!r} in place; the canonical graph "
            "cannot update buffers other than BatchNorm statistics. Keep the state outside the model or "
            "use capture='fx' with the module registered as a leaf (repq_fx.register_leaf_module)")


# -- batch norm -------------------------------------------------------------------------------------

def _map_batch_norms(ctx: _Context) -> None:
    for node in list(ctx.graph.nodes):
        if node.op == "call_function" and _packet(node.target) in _BN_PACKETS:
            _map_batch_norm(ctx, node)


def _map_batch_norm(ctx: _Context, node: fx.Node) -> None:
    args = bind(node)
    packet = _packet(node.target)
    if "training" in args:
        training = bool(args["training"])
    else:
        training = packet in ("_batch_norm_with_update", "_batch_norm_with_update_functional")
    owner = _bn_owner(ctx, node, args)
    module = ctx.root.get_submodule(owner)
    expected = ctx.mode == "train" or module.running_mean is None
    if training != expected:
        raise UnsupportedOpError(
            f"{_op_name(node)} at {_where(node)} normalizes with {'batch' if training else 'running'} statistics "
            f"in a {ctx.mode}-mode capture, unlike {owner!r} would: its training flag is written into the model's "
            "code, so the captured graph could not follow .train()/.eval()")
    if abs(float(args.get("eps", module.eps)) - float(module.eps)) > 1e-12 * max(1.0, abs(module.eps)):
        raise UnsupportedOpError(f"{_op_name(node)} at {_where(node)} uses eps={args['eps']}, not {owner!r}'s "
                                 f"eps={module.eps}")
    graph = ctx.graph
    with graph.inserting_before(node):
        ref = graph.get_attr(owner)
        new = graph.call_function(batch_norm, (args["input"], ref))
    val = node.meta.get("val")
    new.meta = dict(node.meta)
    new.meta["val"] = val[0] if isinstance(val, (tuple, list)) else val
    ctx.bn_paths.add(owner)
    if not isinstance(val, (tuple, list)):
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return
    returns = node.target._schema.returns
    for user in list(node.users):
        if user.op != "call_function" or user.target is not operator.getitem:
            raise UnsupportedOpError(f"{_op_name(user)} at {_where(user)} uses the whole result of {_op_name(node)}")
        i = user.args[1]
        if i == 0:
            user.replace_all_uses_with(new)
        elif returns[i].name in ("running_mean_out", "running_var_out"):
            field = "running_mean" if returns[i].name == "running_mean_out" else "running_var"
            with graph.inserting_after(new):
                stat = graph.get_attr(f"{owner}.{field}")  # updated in place by the module, as in the model
            stat.meta = dict(user.meta)
            user.replace_all_uses_with(stat)
        elif user.users:
            raise UnsupportedOpError(f"{_op_name(node)} at {_where(node)}: its output {i} (batch statistics) is "
                                     "used by the model; the canonical batch_norm does not expose it")
        graph.erase_node(user)
    graph.erase_node(node)


def _bn_owner(ctx: _Context, node: fx.Node, args: dict[str, Any]) -> str:
    """The BatchNorm module whose own parameters and buffers this batch norm uses."""
    fields = {"weight": "weight", "bias": "bias", "running_mean": "running_mean", "running_var": "running_var"}
    owners = set()
    for arg, field in fields.items():
        v = args.get(arg)
        if isinstance(v, fx.Node):
            if v.op != "get_attr" or not v.target.endswith("." + field) and v.target != field:
                return _bn_refusal(node, f"its {arg} is computed ({v.name}), not a BatchNorm module's own {field}")
            owners.add(v.target.rpartition(".")[0])
    if not owners:
        stack = node.meta.get("nn_module_stack") or {}
        for raw, _ in reversed(list(stack.values())):
            path = _module_path(raw)
            try:
                if is_batch_norm(ctx.root.get_submodule(path)):
                    owners.add(path)
                    break
            except AttributeError:
                continue
    if len(owners) != 1:
        return _bn_refusal(node, "its tensors belong to " + (", ".join(sorted(owners)) or "no module"))
    owner = owners.pop()
    try:
        module = ctx.root.get_submodule(owner)
    except AttributeError:
        return _bn_refusal(node, f"{owner!r} is not a module")
    if not is_batch_norm(module):
        return _bn_refusal(node, f"{owner!r} is a {type(module).__name__}, not a BatchNorm")
    for arg, field in fields.items():
        present = isinstance(args.get(arg), fx.Node)
        if present != (getattr(module, field, None) is not None):
            return _bn_refusal(node, f"it {'uses' if present else 'does not use'} {owner}.{field}")
    return owner


def _bn_refusal(node: fx.Node, why: str) -> str:
    raise UnsupportedOpError(
        f"{_op_name(node)} at {_where(node)} cannot become a BatchNorm that follows .train()/.eval(): {why}. "
        "Call the BatchNorm module itself (self.bn(x)) instead of F.batch_norm on computed tensors")


# -- checks -----------------------------------------------------------------------------------------

def _drop_asserts(ctx: _Context) -> None:
    for node in list(ctx.graph.nodes):
        if node.op == "call_function" and not node.users and (
                _packet(node.target) in _ASSERTS or node.target in (torch._assert, torch._check)):
            ctx.graph.erase_node(node)


def _check_random_ops(ctx: _Context) -> None:
    for node in ctx.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if torch.Tag.nondeterministic_seeded not in node.target.tags:
            continue
        if _packet(node.target) in ("native_dropout", "dropout", "feature_dropout", "alpha_dropout",
                                    "feature_alpha_dropout"):
            continue  # mapped to a Dropout module below
        if ctx.mode == "train":
            raise UnsupportedOpError(
                f"{_op_name(node)} at {_where(node)} draws random numbers in the train-mode capture: the export "
                "graph has the model's train/eval branch baked in, so it would stay on in eval mode. Use "
                "nn.Dropout or timm's DropPath at rate 0 for QAT, or capture='fx' (DropPath is kept as a module)")


def _check_mutable_ops(ctx: _Context) -> None:
    for node in ctx.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target._schema.is_mutable:
            raise UnsupportedOpError(f"{_op_name(node)} at {_where(node)} mutates a tensor in place; "
                                     "the functional capture could not remove it")


# -- slice-assigned padding ---------------------------------------------------------------------------

def _rewrite_slice_paddings(ctx: _Context) -> None:
    found = find_slice_paddings(ctx.graph, ctx.sizes)
    for p in found.values():
        _emit_padding(ctx, p)


def _emit_padding(ctx: _Context, p: SlicePadding) -> None:
    graph = ctx.graph
    val = p.terminal.meta.get("val")
    with graph.inserting_before(p.terminal):
        if not any(p.pads):
            out = p.x
        elif isinstance(p.value, float):
            out = graph.call_function(F.pad, (p.x, p.pads, "constant", p.value))
        else:
            v = p.value
            vval = v.meta.get("val")
            if not (isinstance(vval, torch.Tensor) and vval.dim() == 4 and vval.shape[0] == 1
                    and vval.shape[2] == 1 and vval.shape[3] == 1):
                v = graph.call_function(torch.reshape, (v, (1, -1, 1, 1)))
            shifted = graph.call_function(operator.sub, (p.x, v))
            shifted.meta["val"] = p.x.meta.get("val")
            padded = graph.call_function(F.pad, (shifted, p.pads, "constant", 0.0))
            padded.meta["val"] = val
            out = graph.call_function(operator.add, (padded, v))
    if out is not p.x:
        out.meta["val"] = val
    p.terminal.replace_all_uses_with(out)


# -- op table ---------------------------------------------------------------------------------------

Rewrite = Callable[[_Context, fx.Node, dict], Any]
_REWRITES: dict[str, Rewrite] = {}


def _rewrite(*packets: str) -> Callable[[Rewrite], Rewrite]:
    def deco(fn: Rewrite) -> Rewrite:
        for p in packets:
            _REWRITES[p] = fn
        return fn
    return deco


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@_rewrite("conv2d", "convolution", "_convolution")
def _conv(ctx: _Context, node: fx.Node, a: dict) -> Any:
    # conv2d / convolution(x, w, b, stride, padding, dilation, transposed=False, ..., groups) -> F.conv2d
    if a.get("transposed"):
        return None
    w = a["weight"]
    wval = w.meta.get("val") if isinstance(w, fx.Node) else None
    if not isinstance(wval, torch.Tensor) or wval.dim() != 4:
        return None
    padding = a["padding"]
    if isinstance(padding, str):
        padding = _string_padding(padding, tuple(wval.shape), a["dilation"])
        if padding is None:
            return None
    if isinstance(padding, (list, tuple)) and len(padding) == 1:
        padding = (padding[0], padding[0])
    return _call(ctx, node, F.conv2d, (a["input"], w, a["bias"], _tuple(a["stride"]), _tuple(padding),
                                       _tuple(a["dilation"]), int(a["groups"])))


def _string_padding(padding: str, weight_shape: tuple[int, ...], dilation: Any) -> tuple[int, int] | None:
    if padding == "valid":
        return (0, 0)
    d = list(dilation) if isinstance(dilation, (list, tuple)) else [dilation, dilation]
    d = d * 2 if len(d) == 1 else d
    total = [di * (k - 1) for di, k in zip(d, weight_shape[2:])]
    if any(t % 2 for t in total):
        return None  # even kernels pad asymmetrically
    return tuple(t // 2 for t in total)


@_rewrite("linear")
def _linear(ctx: _Context, node: fx.Node, a: dict) -> Any:
    return _call(ctx, node, F.linear, (a["input"], a["weight"], a["bias"]))


@_rewrite("relu")
def _relu(ctx: _Context, node: fx.Node, a: dict) -> Any:
    return _call(ctx, node, F.relu, (a["self"],))


def _arith(op: Any, reflected: bool = False) -> Rewrite:
    # add/sub(self, other, alpha) -> self op alpha * other; rsub(self, other, alpha) -> other - alpha * self
    def rewrite(ctx: _Context, node: fx.Node, a: dict) -> Any:
        if not _is_tensor(node):
            return None
        x, y = (a["other"], a["self"]) if reflected else (a["self"], a["other"])
        alpha = a.get("alpha", 1)
        if alpha not in (1, None):
            with ctx.graph.inserting_before(node):
                y = ctx.graph.call_function(operator.mul, (y, alpha))
        return _call(ctx, node, op, (x, y))
    return rewrite


_rewrite("add")(_arith(operator.add))
_rewrite("sub")(_arith(operator.sub))
_rewrite("rsub")(_arith(operator.sub, reflected=True))
_rewrite("mul")(_arith(operator.mul))


@_rewrite("div")
def _div(ctx: _Context, node: fx.Node, a: dict) -> Any:
    if not _is_tensor(node) or a.get("rounding_mode") is not None:
        return None
    return _call(ctx, node, operator.truediv, (a["self"], a["other"]))


@_rewrite("neg")
def _neg(ctx: _Context, node: fx.Node, a: dict) -> Any:
    return _call(ctx, node, operator.neg, (a["self"],))


@_rewrite("cat", "concat", "concatenate")
def _cat(ctx: _Context, node: fx.Node, a: dict) -> Any:
    return _call(ctx, node, torch.cat, (list(a["tensors"]), int(a["dim"])))


@_rewrite("pad")
def _pad(ctx: _Context, node: fx.Node, a: dict) -> Any:
    value = a.get("value")
    return _call(ctx, node, F.pad, (a["self"], _tuple(a["pad"]), a["mode"], 0.0 if value is None else float(value)))


@_rewrite("constant_pad_nd")
def _constant_pad(ctx: _Context, node: fx.Node, a: dict) -> Any:
    return _call(ctx, node, F.pad, (a["self"], _tuple(a["pad"]), "constant", float(a.get("value") or 0.0)))


@_rewrite("avg_pool2d")
def _avg_pool(ctx: _Context, node: fx.Node, a: dict) -> Any:
    stride = _tuple(a["stride"]) or None
    return _call(ctx, node, F.avg_pool2d, (a["self"], _tuple(a["kernel_size"]), stride, _tuple(a["padding"]),
                                           bool(a["ceil_mode"]), bool(a["count_include_pad"]), a["divisor_override"]))


@_rewrite("slice")
def _crop(ctx: _Context, node: fx.Node, a: dict) -> Any:
    # slice(x, dim, start, end) with a full range -> x; on H or W -> x[:, :, a:-b] (a crop)
    x = a["self"]
    if not _is_tensor(node) or not _is_tensor(x) or a["step"] != 1:
        return None
    start, end, rank = a["start"], a["end"], x.meta["val"].dim()
    dim = a["dim"] + rank if a["dim"] < 0 else a["dim"]
    if start in (None, 0) and (end is None or (isinstance(end, int) and end >= _INT_MAX)):
        return x
    if rank != 4 or dim not in (2, 3) or not isinstance(start, (int, type(None))) \
            or not isinstance(end, (int, type(None))):
        return None
    start = start or 0
    stop = None if end is None or end >= _INT_MAX else end
    if start < 0 or (stop is not None and stop >= 0):
        return None
    index: tuple = (slice(None), slice(None), slice(start, stop)) if dim == 2 else \
        (slice(None), slice(None), slice(None), slice(start, stop))
    return _call(ctx, node, operator.getitem, (x, index))


@_rewrite("clone", "contiguous")
def _clone(ctx: _Context, node: fx.Node, a: dict) -> Any:
    # clone(x) of an input-dependent tensor -> x (the graph is functional)
    x = a["self"]
    return x if node in ctx.tensors and _is_tensor(x) else None


@_rewrite("dropout", "native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
def _dropout(ctx: _Context, node: fx.Node, a: dict) -> Any:
    x = a.get("input", a.get("self"))
    p = float(a["p"])
    train = a.get("train", True)
    packet = _packet(node.target)
    if packet == "native_dropout":
        getters = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if any(i != 0 and g.users for i, g in getters.items()) or len(getters) != len(node.users):
            raise UnsupportedOpError(f"{_op_name(node)} at {_where(node)}: the dropout mask is used by the model")
        if p == 0 or not train:
            out = x
        else:
            out = _dropout_module(ctx, node, x, p, packet)
        for i, g in getters.items():
            if i == 0:
                g.replace_all_uses_with(out)
            ctx.graph.erase_node(g)
        ctx.graph.erase_node(node)
        return "erased"
    if p == 0 or not train:
        return x
    return _dropout_module(ctx, node, x, p, packet)


def _dropout_module(ctx: _Context, node: fx.Node, x: fx.Node, p: float, packet: str) -> fx.Node:
    cls = {"feature_dropout": nn.Dropout2d, "alpha_dropout": nn.AlphaDropout,
           "feature_alpha_dropout": nn.FeatureAlphaDropout}.get(packet, nn.Dropout)
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


def _functional(ctx: _Context, node: fx.Node, a: dict) -> Any:
    # hardswish(x) -> F.hardswish(x), ... (the forms the FX front end records)
    target, names = _FUNCTIONAL[_packet(node.target)]
    if not _is_tensor(node) or node.target._overloadname != "default":
        return None
    return _call(ctx, node, target, tuple(_tuple(a[n]) for n in names))


for _p in _FUNCTIONAL:
    _rewrite(_p)(_functional)


@_rewrite("gelu")
def _gelu(ctx: _Context, node: fx.Node, a: dict) -> Any:
    new = _call(ctx, node, F.gelu, (a["self"],))
    if a.get("approximate", "none") != "none":
        new.kwargs = {"approximate": a["approximate"]}
    return new


@_rewrite("prelu", "_prelu_kernel")
def _prelu(ctx: _Context, node: fx.Node, a: dict) -> Any:
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
    return _call(ctx, node, F.prelu, (a["self"], w))


@_rewrite("mean")
def _mean(ctx: _Context, node: fx.Node, a: dict) -> Any:
    # mean.dim(x, dims, keepdim) -> x.mean(dims, keepdim)
    if node.target._overloadname != "dim" or a.get("dtype") is not None or not _is_tensor(node):
        return None
    with ctx.graph.inserting_before(node):
        new = ctx.graph.call_method("mean", (a["self"], _tuple(a["dim"]), bool(a["keepdim"])))
    new.meta = dict(node.meta)
    return new


@_rewrite("view", "_unsafe_view", "reshape", "flatten")
def _flatten(ctx: _Context, node: fx.Node, a: dict) -> Any:
    # view(x, [N, C*H*W]) with N = x.shape[0] -> torch.flatten(x, 1) (what x.flatten(1) became);
    # flatten.using_ints(x, 1) where the program was not decomposed (see in_place.py) likewise
    x, val = a["self"], node.meta.get("val")
    xval = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not (isinstance(val, torch.Tensor) and isinstance(xval, torch.Tensor)) or val.dim() != 2 or xval.dim() < 2:
        return None
    if not _same_size(val.shape[0], xval.shape[0]) or not all(is_concrete(s) for s in xval.shape[1:]):
        return None
    rest = 1
    for s in xval.shape[1:]:
        rest *= int(s)
    if not is_concrete(val.shape[1]) or int(val.shape[1]) != rest:
        return None
    return _call(ctx, node, torch.flatten, (x, 1))


def is_concrete(s: Any) -> bool:
    return isinstance(s, int) or (isinstance(s, torch.SymInt) and s.node.expr.is_number)


def _same_size(a: Any, b: Any) -> bool:
    if is_concrete(a) and is_concrete(b):
        return int(a) == int(b)
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return False


def _call(ctx: _Context, node: fx.Node, target: Any, args: tuple) -> fx.Node:
    with ctx.graph.inserting_before(node):
        new = ctx.graph.call_function(target, args)
    new.meta = dict(node.meta)
    return new


def _map_ops(ctx: _Context) -> None:
    ctx.tensors = _input_dependent(ctx.graph)
    for node in list(ctx.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        rewrite = _REWRITES.get(_packet(node.target))
        if rewrite is None:
            continue
        new = rewrite(ctx, node, bind(node))
        if new is None or new == "erased" or new is node:
            continue
        if isinstance(new, fx.Node) and new in ctx.tensors or node in ctx.tensors:
            ctx.tensors.add(new)
        node.replace_all_uses_with(new)
        ctx.graph.erase_node(node)


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def _follow_parameter_device(ctx: _Context) -> None:
    """``device=cpu`` written by export into factory calls becomes the device of the model's parameters,
    so the captured graph still runs after ``.to(device)``."""
    graph = ctx.graph
    anchor = None
    for node in graph.nodes:
        if node.op == "get_attr" and isinstance(node.meta.get("val"), torch.Tensor):
            anchor = node
            break
    if anchor is None:
        return
    for node in list(graph.nodes):
        if node.op == "call_function" and isinstance(node.kwargs.get("device"), torch.device):
            with graph.inserting_before(node):
                device = graph.call_function(getattr, (anchor, "device"))
            node.update_kwarg("device", device)


def _rename_size_arithmetic(ctx: _Context) -> None:
    """Size arithmetic gets its own function names; sizes of intermediates are read from the inputs."""
    graph = ctx.graph
    by_symbol: dict[Any, tuple[fx.Node, int]] = {}
    for ph in (n for n in graph.nodes if n.op == "placeholder"):
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor):
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                    by_symbol.setdefault(s.node.expr, (ph, d))
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _SIZE_OPS and isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, int, float)) \
                and not isinstance(node.meta.get("val"), bool):
            node.target = _SIZE_OPS[node.target]
        elif node.target is aten.sym_size.int and node.args[0].op != "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.SymInt) and val.node.expr in by_symbol:
                node.args = by_symbol[val.node.expr]


__all__ = ["canonicalize_exported", "size_add", "size_sub", "size_mul", "size_floordiv", "size_truediv",
           "size_mod", "size_neg"]
