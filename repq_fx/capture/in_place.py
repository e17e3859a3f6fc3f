"""Skip the second trace of a torch.export program where it would change nothing the canonicalizer keeps.

``torch.export`` (non-strict) gives the training IR, where in-place ops stay in place: ReLU
(``inplace=True``) as ``relu_``, BatchNorm's ``num_batches_tracked.add_(1)``, slice assignment as
``copy_`` into a view. ``ExportedProgram.run_decompositions({})`` functionalizes them by tracing the
whole program a second time, which is two thirds of an export capture (timm ``repvit_m0_9``: 12 s
of 18 s). Most graphs only hold two simple kinds, rewritten here in place of that re-trace:

- ``op_(x, ...)`` where ``x`` is a fresh tensor (the result of an op that does not return a view or an
  alias) that nothing else reads: the same as ``op(x, ...)``, since no one can see ``x`` change;
- ``num_batches_tracked.add_(...)`` of a BatchNorm module whose result is unused: the canonical graph
  calls the BatchNorm module, which counts its batches itself (the functionalized graph's buffer
  mutation is dropped for the same reason, see ``aten_canonicalize``).

The re-trace also decomposes composite ops (``CompositeImplicitAutograd``: ``reshape`` becomes
``view``, ``chunk`` becomes ``split``, ...). Only the ones canonicalized to the same node either way
may stay (``_SAME_EITHER_WAY``: ``conv2d``, ``linear``, ``batch_norm``, dropout, the head's
``flatten(x, 1)``, ...), so that the canonical graph is the one the re-trace gives. Anything else (a
write into a view, into a parameter or other buffer, into a tensor read elsewhere; another composite
op) and :func:`remove_in_place_ops` says the program still needs the re-trace: the caller then
functionalizes it with ``run_decompositions({})``.

>>> import torch.nn as nn
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True)).eval()
>>> ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),), strict=False)
>>> [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
['aten.conv2d.default', 'aten.relu_.default']
>>> remove_in_place_ops(ep, model), [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
(True, ['aten.conv2d.default', 'aten.relu.default'])
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export.graph_signature import InputKind

_BATCH_COUNTER = "num_batches_tracked"
#: composite ops that aten_canonicalize maps to the same canonical node whether decomposed or not
_SAME_EITHER_WAY = {"conv2d", "linear", "adaptive_avg_pool2d", "batch_norm", "dropout", "feature_dropout",
                    "alpha_dropout", "feature_alpha_dropout"}


def remove_in_place_ops(ep: Any, root: nn.Module) -> bool:
    """Rewrite the in-place ops of ``ep`` (exported from ``root``) that need no functionalization (see the
    module docstring); ``True`` if no op of the graph mutates a tensor any more and no composite op is
    left that ``run_decompositions`` would rewrite."""
    if any(_decomposed_differently(n) for n in ep.graph.nodes):
        return False
    buffers = {node: spec.target for node, spec in zip(_placeholders(ep.graph), ep.graph_signature.input_specs)
               if spec.kind == InputKind.BUFFER}
    functional: dict[fx.Node, Any] = {}  # in-place op -> its out-of-place form (then a fresh tensor itself)
    counters: list[fx.Node] = []
    for node in ep.graph.nodes:
        if not _mutates(node):
            continue
        if _is_batch_counter_update(node, buffers, root):
            counters.append(node)
            continue
        out_of_place = _out_of_place(node.target)
        x = node.args[0] if node.args else None
        if out_of_place is None or not _private_fresh_tensor(x, node, functional):
            return False
        functional[node] = out_of_place
    for node, target in functional.items():
        node.target = target
    for node in counters:
        ep.graph.erase_node(node)
    return True


def _decomposed_differently(node: fx.Node) -> bool:
    """A composite op that ``run_decompositions({})`` would replace by other ops (see ``_SAME_EITHER_WAY``)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if not torch._C._dispatch_has_kernel_for_dispatch_key(node.target.name(), "CompositeImplicitAutograd"):
        return False
    name = _packet(node).rstrip("_")  # an in-place form becomes the out-of-place one
    if name == "flatten":  # the head's flatten(x, 1) becomes torch.flatten(x, 1) either way
        return node.target._overloadname != "using_ints" or tuple(node.args[1:3]) not in ((1,), (1, -1))
    return name not in _SAME_EITHER_WAY


def _placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def _mutates(node: fx.Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.is_mutable)


def _out_of_place(target: torch._ops.OpOverload) -> Any:
    """``aten.relu_.default`` -> ``aten.relu.default`` (same arguments, first one written), else ``None``."""
    schema = target._schema
    name = schema.name.split("::")[-1]
    if not name.endswith("_") or name.endswith("__") or target.namespace != "aten":
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    overload = getattr(packet, target._overloadname, None) if packet is not None else None
    if overload is None:
        return None
    args, other = schema.arguments, overload._schema.arguments
    if [str(a.type) for a in args] != [str(a.type) for a in other] or overload._schema.is_mutable:
        return None
    written = [a.name for a in args if a.alias_info is not None and a.alias_info.is_write]
    return overload if written == [args[0].name] else None


def _private_fresh_tensor(x: Any, writer: fx.Node, functional: dict[fx.Node, Any]) -> bool:
    """``x`` is a new tensor (not an input, buffer or view of one) that only ``writer`` reads;
    ``functional``: in-place ops already found to be out-of-place ones (``a + b`` then ``+= c``)."""
    if not isinstance(x, fx.Node) or set(x.users) != {writer} or x.op != "call_function":
        return False
    if x in functional:
        return True
    source = x
    if x.target is operator.getitem:  # one result of a multi-output op
        source = x.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_function":
            return False
    target = source.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    schema = target._schema
    return not schema.is_mutable and all(r.alias_info is None for r in schema.returns)


def _is_batch_counter_update(node: fx.Node, buffers: dict[fx.Node, str], root: nn.Module) -> bool:
    """``add_`` into a BatchNorm module's ``num_batches_tracked`` whose result nothing reads."""
    x = node.args[0] if node.args else None
    if node.users or not isinstance(x, fx.Node) or x not in buffers or _packet(node) != "add_":
        return False
    owner, _, field = buffers[x].rpartition(".")
    if field != _BATCH_COUNTER:
        return False
    try:
        module = root.get_submodule(owner)
    except AttributeError:
        return False
    normalizes = any(t == f"{owner}.running_mean" and b.users for b, t in buffers.items())  # the module runs
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and normalizes


def _packet(node: fx.Node) -> str:
    return node.target._schema.name.split("::")[-1]


__all__ = ["remove_in_place_ops"]
