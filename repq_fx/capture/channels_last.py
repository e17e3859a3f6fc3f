"""A linear on channels-last pixels followed by a BatchNorm becomes the 1x1 conv it is (a step of
:func:`repq_fx.capture.canonicalize.canonicalize`).

>>> import torch.nn as nn
>>> from repq_fx.capture import capture
>>> class M(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm2d(6)
...     def forward(self, x):
...         return self.bn(self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
>>> [getattr(n.target, "__name__", n.target) for n in capture(M()).graph.nodes if n.op == "call_function"]
['conv2d', 'batch_norm']
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ir import BatchNormView, batch_norm, fetch_attr


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


def linear_then_batch_norm(gm: fx.GraphModule) -> None:
    """``bn(linear(x, W, b).permute(0, 3, 1, 2))`` -> ``bn(conv2d(x.permute(0, 3, 1, 2), W[:, :, None, None], b))``.

    A linear on channels-last pixels, moved to channels-first, is a 1x1 conv of the moved input
    (ConvNeXt-style MLPs; UniRepLKNet's ``pwconv2``). Written as a conv, the BatchNorm that follows
    folds into it like into any conv (UniRepLKNet's own ``reparameterize`` folds it into the linear).
    Only where a BatchNorm follows: other linears stay linears.
    """
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target is not batch_norm:
            continue
        moved = BatchNormView.of(bn).x
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
