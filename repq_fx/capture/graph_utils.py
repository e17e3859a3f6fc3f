"""Small GraphModule helpers shared by the passes: attribute lookup, free names, parameter dtype.

>>> import torch.nn as nn, torch.fx as fx
>>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 1, 1)))
>>> fetch_attr(gm, "0.weight").shape, free_module_path(gm, "0"), param_dtype(gm)
(torch.Size([1, 1, 1, 1]), '0_1', torch.float32)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    """The object at a dotted ``get_attr`` target (a tensor or a module)."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def free_module_path(gm: fx.GraphModule, target: str) -> str:
    """``target``, or ``target_1``, ``target_2``... whichever is not taken yet."""
    name, i = target, 1
    while _taken(gm, name):
        name, i = f"{target}_{i}", i + 1
    return name


def _taken(gm: fx.GraphModule, target: str) -> bool:
    try:
        fetch_attr(gm, target)
        return True
    except AttributeError:
        return False


def param_dtype(gm: torch.nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter (the default dtype if there is none)."""
    for p in gm.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()
