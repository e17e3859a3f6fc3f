"""The merge pass: every exact block becomes one ``nn.Conv2d``; everything else stays as it was.

>>> import torch.nn as nn
>>> from repq_fx.capture import capture
>>> gm = merge_blocks(capture(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))))
>>> [type(m).__name__ for m in gm.children()]
['Conv2d']
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..algebra import ConvParams, to_module
from ..capture.canonicalize import CHANNELS_FIRST_FOR_LINEAR
from ..ir import finish_pass, free_module_path, param_dtype
from ..patterns.blocks import Analysis, Block, find_blocks


def merge_blocks(gm: fx.GraphModule, analysis: Analysis | None = None) -> fx.GraphModule:
    """Rewrite ``gm`` (canonical, in place): each merged block's exit becomes ``conv(entry)``."""
    analysis = analysis or find_blocks(gm)
    dtype = param_dtype(gm)
    replaced: dict[fx.Node, fx.Node] = {}  # block exit -> its merged conv node
    for block in analysis.blocks:
        if block.merged and not _is_plain_conv(block):
            replaced[block.region.exit] = _replace_with_conv(gm, block, dtype, replaced)
    return finish_pass(gm)


def _is_plain_conv(block: Block) -> bool:
    """A lone conv with symmetric padding: rewriting it would change nothing."""
    return len(block.ops) == 1 and block.ops[0].is_conv


def _replace_with_conv(gm: fx.GraphModule, block: Block, dtype: torch.dtype,
                       replaced: dict[fx.Node, fx.Node]) -> fx.Node:
    device = next((p.device for p in gm.parameters()), None)
    exit_ = block.region.exit
    entry = replaced.get(block.region.entry, block.region.entry)
    if _is_pointwise(block.conv) and entry.meta.get(CHANNELS_FIRST_FOR_LINEAR):
        return _replace_with_linear(gm, block, dtype, device, entry)
    outputs = []
    for params in block.parts or (block.conv,):  # one conv, or one per concatenated branch
        conv = to_module(params, dtype=dtype)
        if device is not None:
            conv = conv.to(device)
        target = free_module_path(gm, f"{block.module_scope}.reparam_conv" if block.module_scope else "reparam_conv")
        gm.add_submodule(target, conv)
        with gm.graph.inserting_before(exit_):
            outputs.append(gm.graph.call_module(target, (entry,)))
    new = outputs[0]
    if block.parts:
        with gm.graph.inserting_before(exit_):
            new = gm.graph.call_function(torch.cat, (outputs, 1))
    new.meta = dict(exit_.meta)
    exit_.replace_all_uses_with(new)
    return new


def _is_pointwise(p: ConvParams | None) -> bool:
    return p is not None and tuple(p.weight.shape[2:]) == (1, 1) and p.stride == (1, 1) and p.padding == (0, 0) \
        and p.groups == 1


def _replace_with_linear(gm: fx.GraphModule, block: Block, dtype: torch.dtype, device: torch.device | None,
                         entry: fx.Node) -> fx.Node:
    """A merged 1x1 conv that reads a linear's channels-last input moved to channels-first (see
    ``capture.canonicalize``): written back as the linear, on the channels-last input, moved after it."""
    p = block.conv
    linear = nn.Linear(p.in_channels, p.out_channels, bias=True, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(p.weight.detach()[:, :, 0, 0])
        linear.bias.copy_(p.bias.detach() if p.bias is not None else torch.zeros(p.out_channels))
    target = free_module_path(gm, f"{block.module_scope}.reparam_linear" if block.module_scope else "reparam_linear")
    gm.add_submodule(target, linear)
    exit_ = block.region.exit
    with gm.graph.inserting_before(exit_):
        out = gm.graph.call_module(target, (entry.args[0],))
        new = gm.graph.call_method("permute", (out, *entry.args[1:]))
    new.meta = dict(exit_.meta)
    exit_.replace_all_uses_with(new)
    return new
