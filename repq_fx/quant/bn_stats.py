"""The statistics a BatchNorm inside a block normalizes with, for the three ``bn_mode`` s.

``branch_statistics`` returns ``(mean, var)`` of the tensor a BN sees, where that tensor
is the affine conv map ``(weight, bias, geometry)`` of the block input ``x``:

- eval mode, or ``"running"``: the running statistics;
- ``"batch"`` (RepQ-BN): exact batch statistics of the branch, computed in float;
- ``"estimate"`` (RepQ-BNEst): no branch conv; the mean is ``W @ E[x] + b`` (exact away from
  borders) and the variance ``sum W^2 Var[x]`` (a diagonal input covariance).

In train mode the BN's running statistics are updated exactly as ``nn.BatchNorm2d``
would (momentum or cumulative average, unbiased variance, ``num_batches_tracked``).

>>> bn = torch.nn.BatchNorm2d(2)
>>> x = torch.randn(4, 2, 5, 5)
>>> mean, var = branch_statistics(x, None, None, (1, 1), ((0, 0), (0, 0)), (1, 1), 1, None, bn, "batch")
>>> bool(torch.allclose(mean, x.mean((0, 2, 3)))), int(bn.num_batches_tracked)
(True, 1)
"""
from __future__ import annotations


import torch
import torch.nn as nn

from ..algebra import AffineConv, apply
from ..algebra.kernels import per_input_channel

Pads = tuple[tuple[int, int], tuple[int, int]]


def branch_statistics(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: Pads,
    dilation: tuple[int, int],
    groups: int,
    pad_value: torch.Tensor | None,
    bn: nn.Module,
    mode: str,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, var)`` the BN normalizes with; updates its running statistics in train mode.

    ``moments`` are the block input's per-channel ``(mean, var)`` (``input_moments``), shared by all
    BNs of a block in ``"estimate"`` mode.
    """
    if not bn.training or mode == "running":
        return bn.running_mean, bn.running_var
    if mode == "batch":
        y = x if weight is None else apply(AffineConv(weight, bias, stride, padding, dilation, groups, pad_value), x)
        var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
        count = y.numel() // y.shape[1]
    elif mode == "estimate":
        mean_x, var_x = moments if moments is not None else input_moments(x, bn)
        mean, var, count = _estimate(x, mean_x, var_x, weight, bias, stride, padding, dilation, groups)
    else:
        raise AssertionError(f"unknown bn_mode {mode!r}")
    _update_running(bn, mean, var, count)
    return mean, var


def input_moments(x: torch.Tensor, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, biased var)`` of ``x`` in train mode (empty tensors in eval mode: unused)."""
    if not bn.training:
        empty = x.new_empty(0)
        return empty, empty
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    return mean, var


def _estimate(x, mean_x, var_x, weight, bias, stride, padding, dilation, groups):
    if weight is None:
        return mean_x, var_x, x.numel() // x.shape[1]
    out_ch = weight.shape[0]
    taps = weight.sum(dim=(2, 3))
    taps_sq = (weight * weight).sum(dim=(2, 3))
    mean = (taps * per_input_channel(mean_x, out_ch, groups)).sum(dim=1)
    if bias is not None:
        mean = mean + bias
    var = (taps_sq * per_input_channel(var_x, out_ch, groups)).sum(dim=1)
    h, w = x.shape[2:]
    sizes = []
    for dim, n in enumerate((h, w)):
        (p0, p1), d, k, s = padding[dim], dilation[dim], weight.shape[2 + dim], stride[dim]
        sizes.append((n + p0 + p1 - d * (k - 1) - 1) // s + 1)
    return mean, var, x.shape[0] * sizes[0] * sizes[1]


def _update_running(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    if not bn.track_running_stats or bn.running_mean is None:
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        unbiased = var * (count / max(count - 1, 1))
        bn.running_mean.mul_(1 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased.detach().to(bn.running_var.dtype), alpha=factor)


def describe_mode(mode: str) -> str:
    """One line for reports.

    >>> describe_mode("estimate")
    'RepQ-BNEst: estimated statistics'
    """
    return {"batch": "RepQ-BN: batch statistics", "estimate": "RepQ-BNEst: estimated statistics",
            "running": "running statistics"}[mode]


__all__ = ["branch_statistics", "input_moments", "describe_mode"]
