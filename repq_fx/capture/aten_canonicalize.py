"""Canonicalize a torch.export program (functional ATen IR) into repq_fx's canonical graph.

The result is the graph the FX front end produces, so ``find_blocks``, ``merge_blocks`` and
``prepare_graph`` run unchanged:

==================================================  =============================================
ATen (after ``run_decompositions({})``)             canonical node
==================================================  =============================================
parameter / buffer / constant placeholders          ``get_attr`` with the module path of the model
``conv2d`` / ``convolution`` (2-D, not transposed)  ``F.conv2d(x, w, b, stride, padding, dilation, groups)``
``_native_batch_norm_legit*`` / ``batch_norm`` ...  ``ir.batch_norm(x, <get_attr of the BN module>)``
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

The op rows are one rule each in :mod:`.aten_rewrites` (a :class:`repq_fx.ir.RuleTable` keyed by ATen op),
batch norms are :mod:`.aten_batch_norm`, size arithmetic :mod:`.aten_sizes`.

Other ATen ops stay as they are: they are functional, so the graph computes what the model
computes; the pipeline treats them as non-linear. What cannot be represented faithfully raises
:class:`UnsupportedOpError` naming the op and the node: a write to a buffer other than a
BatchNorm's statistics, a mutated input, a batch norm on tensors that are not one BatchNorm
module's own (its train/eval mode would be frozen), a random op in a train-mode capture
(it would stay on in eval mode).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._pytree import tree_unflatten

from ..errors import CaptureError, UnsupportedOpError
from ..ir import finish_pass
from .aten_batch_norm import map_batch_norms
from .aten_context import Context, is_tensor, op_name, packet, where
from .aten_rewrites import map_ops
from .aten_sizes import (rename_size_arithmetic, size_add, size_floordiv, size_mod, size_mul, size_neg, size_sub,
                         size_truediv)
from .canvas import Sizes
from .slice_padding import SlicePadding, find_slice_paddings
from .tracer import LeafTracer

_ASSERTS = {"_assert_scalar", "_assert_tensor_metadata", "sym_constrain_range", "sym_constrain_range_for_size",
            "_assert_async", "_functional_assert_async", "_functional_sym_constrain_range",
            "_functional_sym_constrain_range_for_size", "_assert_async.msg"}


def canonicalize_exported(ep: Any, root: nn.Module, *, mode: str, sizes: list[Sizes], name: str) -> fx.GraphModule:
    """The canonical GraphModule of ``ep`` (functional ATen), rooted at ``root`` (the exported copy)."""
    ctx = Context(ep, root, mode, sizes)
    user_outputs, mutations = _lift_placeholders_and_outputs(ctx)
    _set_output(ctx, user_outputs)
    map_batch_norms(ctx)
    _check_mutations(ctx, mutations)
    _drop_asserts(ctx)
    _check_random_ops(ctx)
    _rewrite_slice_paddings(ctx)
    map_ops(ctx)
    rename_size_arithmetic(ctx.graph)
    _follow_parameter_device(ctx)
    _check_mutable_ops(ctx)
    # torch.load re-traces a pickled GraphModule with its graph's tracer: the FX front end's, which
    # keeps repq_fx's own graph functions as calls (export's make_fx tracer cannot be rebuilt)
    ctx.graph._tracer_cls, ctx.graph._tracer_extras = LeafTracer, {}
    gm = fx.GraphModule(root, ctx.graph, name)
    return finish_pass(gm)


# -- signature ------------------------------------------------------------------------------------

def _lift_placeholders_and_outputs(ctx: Context) -> tuple[list[Any], list[tuple[str, fx.Node]]]:
    """Parameters, buffers and constants become ``get_attr`` of their module paths."""
    graph, sig = ctx.graph, ctx.ep.graph_signature
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for node, spec in zip(placeholders, sig.input_specs):
        kind = spec.kind
        if kind == InputKind.USER_INPUT:
            if not is_tensor(node):
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
            raise UnsupportedOpError(f"{op_name(value)} at {where(value)} writes into the model's input "
                                     f"{spec.target!r} in place; the canonical graph cannot mutate its inputs")
        else:
            raise UnsupportedOpError(f"torch.export output {getattr(value, 'name', value)!r} of kind "
                                     f"{spec.kind.name} is not supported")
    return user, mutations


def _install_constant(ctx: Context, target: str, value: torch.Tensor) -> str:
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


def _set_output(ctx: Context, user_outputs: list[Any]) -> None:
    output = next(n for n in ctx.graph.nodes if n.op == "output")
    try:
        structure = tree_unflatten(user_outputs, ctx.ep.call_spec.out_spec)
    except Exception as e:  # custom pytree classes
        raise CaptureError(f"the model's output structure cannot be rebuilt in the captured graph: {e}") from e
    if not isinstance(structure, (fx.Node, tuple, list, dict)):
        raise CaptureError(f"the model returns a {type(structure).__name__}; the export front end supports "
                           "tensors and tuples/lists/dicts of them")
    output.args = (structure,)


def _check_mutations(ctx: Context, mutations: list[tuple[str, fx.Node]]) -> None:
    for target, value in mutations:
        owner, _, field = target.rpartition(".")
        if owner in ctx.bn_paths and field in ("running_mean", "running_var", "num_batches_tracked"):
            continue  # the BatchNorm module updates them itself
        raise UnsupportedOpError(
            f"{op_name(value)} at {where(value)} writes the buffer {target!r} in place; the canonical graph "
            "cannot update buffers other than BatchNorm statistics. Keep the state outside the model or "
            "use capture='fx' with the module registered as a leaf (repq_fx.register_leaf_module)")


# -- checks -----------------------------------------------------------------------------------------

def _drop_asserts(ctx: Context) -> None:
    for node in list(ctx.graph.nodes):
        if node.op == "call_function" and not node.users and (
                packet(node.target) in _ASSERTS or node.target in (torch._assert, torch._check)):
            ctx.graph.erase_node(node)


def _check_random_ops(ctx: Context) -> None:
    for node in ctx.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if torch.Tag.nondeterministic_seeded not in node.target.tags:
            continue
        if packet(node.target) in ("native_dropout", "dropout", "feature_dropout", "alpha_dropout",
                                    "feature_alpha_dropout"):
            continue  # mapped to a Dropout module below
        if ctx.mode == "train":
            raise UnsupportedOpError(
                f"{op_name(node)} at {where(node)} draws random numbers in the train-mode capture: the export "
                "graph has the model's train/eval branch baked in, so it would stay on in eval mode. Use "
                "nn.Dropout or timm's DropPath at rate 0 for QAT, or capture='fx' (DropPath is kept as a module)")


def _check_mutable_ops(ctx: Context) -> None:
    for node in ctx.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target._schema.is_mutable:
            raise UnsupportedOpError(f"{op_name(node)} at {where(node)} mutates a tensor in place; "
                                     "the functional capture could not remove it")


# -- slice-assigned padding ---------------------------------------------------------------------------

def _rewrite_slice_paddings(ctx: Context) -> None:
    found = find_slice_paddings(ctx.graph, ctx.sizes)
    for p in found.values():
        _emit_padding(ctx, p)


def _emit_padding(ctx: Context, p: SlicePadding) -> None:
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


def _follow_parameter_device(ctx: Context) -> None:
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



__all__ = ["canonicalize_exported", "size_add", "size_sub", "size_mul", "size_floordiv", "size_truediv",
           "size_mod", "size_neg"]
