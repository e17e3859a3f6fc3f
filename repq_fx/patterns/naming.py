"""The names of blocks: the module path their parameters share, made unique across the model.

>>> import torch.nn as nn
>>> from repq_fx.capture import capture
>>> from repq_fx.patterns.blocks import find_blocks
>>> [b.name for b in find_blocks(capture(nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()))).blocks]
['']
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..ir import ConvView, fetch_attr
from .regions import Region

if TYPE_CHECKING:
    from .blocks import Block


def unique_names(blocks: list[Block], gm: fx.GraphModule) -> list[Block]:
    """Blocks that share a name (the convs of one module, e.g. a Fire module's squeeze and expand
    convs, all named after it) are named after their first conv's module path instead; a name that
    is still shared (one conv module called twice) gets ``@2``, ``@3``... in graph order.

    >>> import torch.nn as nn
    >>> from repq_fx.capture import capture
    >>> from repq_fx.patterns.blocks import find_blocks
    >>> [b.name for b in find_blocks(capture(nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1)))).blocks]
    ['0', '2']
    """
    counts = Counter(b.name for b in blocks)
    names = [conv_path(gm, b) or b.name if counts[b.name] > 1 else b.name for b in blocks]
    counts, seen = Counter(names), Counter()
    renamed = []
    for block, name in zip(blocks, names):
        seen[name] += 1
        if counts[name] > 1 and seen[name] > 1:
            name = f"{name}@{seen[name]}"
        renamed.append(block if name == block.name else dataclasses.replace(block, name=name, scope=block.name))
    return renamed


def conv_path(gm: fx.GraphModule, block: Block) -> str:
    """The module path of the block's first conv weight ("" if the weight is computed)."""
    return next((ConvView.of(op.node).weight_owner(gm) for op in block.ops if op.is_conv), "")


def block_name(region: Region, gm: fx.GraphModule) -> str:
    """The longest module path shared by the block's parameters (``stages.0.0`` for a timm RepVggBlock)."""
    paths = []
    for n in region.nodes:
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                obj = fetch_attr(gm, a.target)
                paths.append(a.target if isinstance(obj, torch.nn.Module) else a.target.rpartition(".")[0])
        if n.op == "call_module":
            paths.append(n.target)
    if not paths:
        return region.exit.name
    common = ".".join(os.path.commonprefix([p.split(".") for p in paths]))
    if common in paths:  # all ops belong to one module (a conv with a residual): name the block by its parent
        common = common.rpartition(".")[0]
    return common
