"""Sizes read from parameters become constants (a step of :func:`repq_fx.capture.canonicalize.canonicalize`).

>>> import torch.nn as nn, torch.fx as fx
>>> class M(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))
...     def forward(self, x):
...         return nn.functional.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2)
>>> gm = fx.symbolic_trace(M())
>>> fold_parameter_sizes(gm)
>>> next(n for n in gm.graph.nodes if n.op == "call_function").kwargs["padding"]
1
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..ir import fetch_attr, is_size_value


def fold_parameter_sizes(gm: fx.GraphModule) -> None:
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
