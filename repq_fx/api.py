"""The public entry points: ``explain`` and ``merge`` (``prepare``/``lower`` build on the same analysis).

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
>>> merged = merge(model)
>>> x = torch.randn(1, 3, 8, 8)
>>> bool(torch.allclose(merged(x), model(x), atol=1e-5))
True
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from .capture import capture
from .passes.merge import merge_blocks
from .patterns.blocks import find_blocks
from .report import Report, build_report


def explain(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None) -> Report:
    """What ``merge`` would merge, with each block's branches, and why anything is left alone.

    >>> import torch.nn as nn
    >>> print(explain(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))))  # doctest: +NORMALIZE_WHITESPACE
    Sequential: 1 of 1 blocks merged into one conv each, 2 convs -> 1
    block   branches        convs  merged  reason
    <root>  conv3x3 -> bn   1      -> 3x3
    """
    gm = capture(model, example_inputs)
    return build_report(type(model).__name__, gm, find_blocks(gm))


def merge(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None) -> fx.GraphModule:
    """The float deploy model: every mergeable block as one conv (BN folded with running statistics).

    The result equals ``model.eval()``; ``model`` itself is not modified. It is returned in eval mode.
    """
    gm = capture(model, example_inputs)
    merged = merge_blocks(gm, find_blocks(gm))
    return merged.eval()
