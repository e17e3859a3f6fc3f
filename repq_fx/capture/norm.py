"""The one canonical BatchNorm op: a norm module applied without its activation.

``batch_norm(x, module)`` computes exactly what torch's own BatchNorm forward
computes with the module's state, following ``module.training`` at run time
(batch statistics and running-stat updates in train mode, running statistics in
eval mode). Norm-act wrappers such as timm's ``BatchNormAct2d`` are split into
this op followed by their ``drop`` and ``act`` submodules.

>>> bn = torch.nn.BatchNorm2d(3).eval()
>>> x = torch.randn(2, 3, 4, 4)
>>> bool(torch.equal(batch_norm(x, bn), bn(x)))
True
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _torch_forward(module: nn.Module):
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn") and "forward" in cls.__dict__:
            return cls.__dict__["forward"]
    raise AssertionError(f"{type(module).__name__} has no torch BatchNorm base class")


def batch_norm(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Torch's BatchNorm forward on ``module``'s parameters and buffers, without any activation."""
    return _torch_forward(module)(module, x)


def is_batch_norm(module: nn.Module) -> bool:
    """True for torch BatchNorm layers and their subclasses (timm's BatchNormAct2d included)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)
