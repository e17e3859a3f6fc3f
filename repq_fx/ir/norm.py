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
    """Torch's BatchNorm forward on ``module``'s parameters and buffers, without any activation.
    A training ``nn.SyncBatchNorm`` on the CPU in a process group (which torch's own forward refuses:
    it runs on CUDA only), or a BN marked by ``quant.sync_stats.mark_sync_batch_norm``, normalizes
    with the global batch's statistics (``quant.sync_stats``)."""
    if module.training and ((isinstance(module, nn.SyncBatchNorm) and x.device.type == "cpu")
                            or getattr(module, "repq_sync_bn", False)):  # quant.sync_stats.SYNC_ATTR
        from ..quant.sync_stats import sync_group

        group = sync_group([module])
        if group is not None:
            return _synced_batch_norm(x, module, group)
    return _torch_forward(module)(module, x)


def _synced_batch_norm(x: torch.Tensor, module: nn.SyncBatchNorm, group: object) -> torch.Tensor:
    from ..quant.bn_stats import _update_running
    from ..quant.sync_stats import sync_moments

    dims = (0, *range(2, x.dim()))
    # statistics in float32 at least (as torch's BN kernels keep them for half inputs): fp16 would round the
    # moments, and its variance of a large batch can overflow
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    var, mean = torch.var_mean(wide, dim=dims, unbiased=False)
    (mean, var, count), = sync_moments([(mean, var, x.numel() // x.shape[1])], group)
    _update_running([module], [mean], [var], [count])
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (wide - mean.reshape(shape)) * torch.rsqrt(var + module.eps).reshape(shape)
    if module.weight is not None:
        y = y * module.weight.reshape(shape)
    if module.bias is not None:
        y = y + module.bias.reshape(shape)
    return y.to(x.dtype)


def is_batch_norm(module: nn.Module) -> bool:
    """True for torch BatchNorm layers and their subclasses (timm's BatchNormAct2d included)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)
