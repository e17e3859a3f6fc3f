"""What the torch.export canonicalizer's steps share: the program being rewritten and how messages name a node.

>>> packet(torch.ops.aten.add.Tensor), packet(len)
('add', '')
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..ir import free_module_path
from .canvas import Sizes

aten = torch.ops.aten


def packet(target: Any) -> str:
    """``aten.add.Tensor`` -> ``"add"`` ("" for non-ATen targets)."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return target._schema.name.split("::")[-1]
    return ""


def op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{packet(t)}.{t._overloadname}"
    return getattr(t, "__name__", str(t))


def where(node: fx.Node) -> str:
    """``node 'add_3' (in module 'stages.0')`` for messages."""
    stack = node.meta.get("nn_module_stack") or {}
    path = module_path(list(stack.values())[-1][0]) if stack else ""
    return f"node {node.name!r}" + (f" (in module {path!r})" if path else "")


def module_path(raw: str) -> str:
    """nn_module_stack paths: ``'L__self__.a.b'`` / ``'a.b@1'`` -> ``'a.b'``."""
    raw = raw.replace("L['self'].", "").replace("L__self__.", "")
    return ".".join(part.split("@")[0] for part in raw.split(".") if part and part != "L__self__")


def is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


class Context:
    """The exported program being rewritten into the canonical graph, rooted at the model's copy."""

    def __init__(self, ep: Any, root: nn.Module, mode: str, sizes: list[Sizes]) -> None:
        self.ep, self.root, self.mode, self.sizes = ep, root, mode, sizes
        self.graph: fx.Graph = ep.graph_module.graph
        self.graph.owning_module = root  # get_attr targets resolve against the model's copy
        self.bn_paths: set[str] = set()
        self.tensors: set[fx.Node] = set()  # input-dependent nodes

    def free_attr(self, stem: str) -> str:
        """A name for a new attribute of the root not taken yet."""
        return free_module_path(self.root, stem)
