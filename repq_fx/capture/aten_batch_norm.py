"""ATen batch norms of a torch.export graph become the canonical ``batch_norm(x, <BN module>)``.

Each one must be one BatchNorm module's own computation (its parameters and buffers, its eps, the
capture's mode), so the canonical op can follow ``.train()``/``.eval()``; anything else is refused
with an :class:`~repq_fx.errors.UnsupportedOpError` naming the node.

>>> "_native_batch_norm_legit_no_training" in BN_PACKETS
True
"""
from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from ..errors import UnsupportedOpError
from ..ir import batch_norm, bind_schema, is_batch_norm
from .aten_context import Context, module_path, op_name, packet, where

BN_PACKETS = {"_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
               "_native_batch_norm_legit", "_batch_norm_with_update_functional", "_batch_norm_with_update",
               "_batch_norm_no_update", "native_batch_norm", "batch_norm", "cudnn_batch_norm",
               "miopen_batch_norm", "_native_batch_norm_legit_no_stats"}


# -- batch norm -------------------------------------------------------------------------------------

def map_batch_norms(ctx: Context) -> None:
    for node in list(ctx.graph.nodes):
        if node.op == "call_function" and packet(node.target) in BN_PACKETS:
            _map_batch_norm(ctx, node)


def _map_batch_norm(ctx: Context, node: fx.Node) -> None:
    args = bind_schema(node)
    name = packet(node.target)
    if "training" in args:
        training = bool(args["training"])
    else:
        training = name in ("_batch_norm_with_update", "_batch_norm_with_update_functional")
    owner = _bn_owner(ctx, node, args)
    module = ctx.root.get_submodule(owner)
    expected = ctx.mode == "train" or module.running_mean is None
    if training != expected:
        raise UnsupportedOpError(
            f"{op_name(node)} at {where(node)} normalizes with {'batch' if training else 'running'} statistics "
            f"in a {ctx.mode}-mode capture, unlike {owner!r} would: its training flag is written into the model's "
            "code, so the captured graph could not follow .train()/.eval()")
    if abs(float(args.get("eps", module.eps)) - float(module.eps)) > 1e-12 * max(1.0, abs(module.eps)):
        raise UnsupportedOpError(f"{op_name(node)} at {where(node)} uses eps={args['eps']}, not {owner!r}'s "
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
            raise UnsupportedOpError(f"{op_name(user)} at {where(user)} uses the whole result of {op_name(node)}")
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
            raise UnsupportedOpError(f"{op_name(node)} at {where(node)}: its output {i} (batch statistics) is "
                                     "used by the model; the canonical batch_norm does not expose it")
        graph.erase_node(user)
    graph.erase_node(node)


def _bn_owner(ctx: Context, node: fx.Node, args: dict[str, Any]) -> str:
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
            path = module_path(raw)
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
        f"{op_name(node)} at {where(node)} cannot become a BatchNorm that follows .train()/.eval(): {why}. "
        "Call the BatchNorm module itself (self.bn(x)) instead of F.batch_norm on computed tensors")


