"""Exact batch statistics of the branches of one block input (``bn_mode="batch"``, RepQ-BN).

One branch: its output ``branch(x)``, then one pass of channel moments. Several branches of one
input (``batch_statistics``): the branch convs of one geometry run as ONE wide conv (their
kernels concatenated along the output channels) and one pass of channel moments, and the
padding-free 1x1 branches and the identity need no conv at all: their exact statistics follow
from the input's channel mean and covariance (``Var[w.x] = w^T Cov(x) w``), one ``C x C``
product for all of them.

>>> x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
>>> (mean, var, count), = batch_statistics(x, [IDENTITY])
>>> bool(torch.allclose(mean, x.mean((0, 2, 3)))), count
(True, 100)
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..algebra import apply
from ..algebra.kernels import per_input_channel
from .branch import IDENTITY, Branch, Pads
from .sync_stats import sync_group, sync_moments

Moments = tuple[torch.Tensor, torch.Tensor, int]  # (mean, biased var, sample count) of each channel


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance over ``(N, H, W)``, two passes (mean, then centred squares).

    Same values as ``torch.var_mean(x, (0, 2, 3), unbiased=False)`` to rounding, and its exact
    gradient ``(dmean + 2 (x - mean) dvar) / M``, but faster on the CPU, where ``var_mean`` over the
    non-contiguous ``(0, 2, 3)`` runs a scalar Welford loop.
    """

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        dims = (0, 2, 3)
        mean = x.mean(dims)
        centred = x - mean.reshape(1, -1, 1, 1)
        var = centred.square_().mean(dims)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, dmean, dvar):  # type: ignore[override]
        x, mean = ctx.saved_tensors
        count = x.numel() // x.shape[1]
        if dvar is None:
            return (dmean / count).reshape(1, -1, 1, 1).expand_as(x).clone()
        dx = x - mean.reshape(1, -1, 1, 1)
        dx.mul_((dvar * (2.0 / count)).reshape(1, -1, 1, 1))
        if dmean is not None:
            dx.add_((dmean / count).reshape(1, -1, 1, 1))
        return dx


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, biased var)`` of each channel of an ``[N, C, H, W]`` tensor (see ``_ChannelMoments``).

    >>> x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    >>> mean, var = channel_moments(x)
    >>> v, m = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    >>> bool(torch.allclose(mean, m) and torch.allclose(var, v))
    True
    """
    if x.device.type != "cpu" or x.dim() != 4:
        var, mean = torch.var_mean(x, dim=(0, *range(2, x.dim())), unbiased=False)
        return mean, var
    return _ChannelMoments.apply(x)


def batch_one(x: torch.Tensor, branch: Branch, bn: nn.Module, moments: Any = None) -> Moments:
    """Exact ``(mean, var, count)`` of ``branch(x)``, of the global batch for a synchronising BN.

    >>> x = torch.randn(2, 3, 4, 4)
    >>> batch_one(x, IDENTITY, nn.BatchNorm2d(3))[2]
    32
    """
    y = x if branch.weight is None else apply(branch.affine(), x)
    mean, var = channel_moments(y)
    count = y.numel() // y.shape[1]
    (mean, var, count), = sync_moments([(mean, var, count)], sync_group([bn]))  # SyncBatchNorm: global batch
    return mean, var, count


def batch_many(x: torch.Tensor, branches: Sequence[Branch], group: Any = None) -> list[Moments]:
    """``batch_one`` of each branch, computed together (see the module docstring); ``group``: the
    process group of synchronising BNs (``sync_stats``), or ``None``.

    >>> [count for _, _, count in batch_many(torch.randn(2, 3, 4, 4), [IDENTITY, IDENTITY])]
    [32, 32]
    """
    return sync_moments(batch_statistics(x, branches), group)


def batch_statistics(x: torch.Tensor, branches: Sequence[Branch]) -> list[Moments]:
    """Exact batch ``(mean, var, count)`` of each branch output (of this process's batch)."""
    out: list[Any] = [None] * len(branches)
    pointwise: dict[tuple[int, int], list[int]] = {}  # stride -> branches computed from Cov(x)
    wide: dict[tuple, list[int]] = {}  # conv geometry -> branches computed by one wide conv
    channels = x.shape[1]
    for i, branch in enumerate(branches):
        padding = branch.padding
        if branch.weight is None:
            pointwise.setdefault((1, 1), []).append(i)
        elif tuple(branch.weight.shape[2:]) == (1, 1) and padding == ((0, 0), (0, 0)):
            pointwise.setdefault(tuple(branch.stride), []).append(i)
        elif branch.pad_value is None and padding[0][0] == padding[0][1] >= 0 and padding[1][0] == padding[1][1] >= 0:
            wide.setdefault(_geometry(branch), []).append(i)
        else:
            y = apply(branch.affine(), x)
            mean, var = channel_moments(y)
            out[i] = (mean, var, y.numel() // y.shape[1])
    for stride, members in pointwise.items():
        members = _covariance_or_conv(x, stride, branches, members, wide)
        for i, stats in zip(members, _pointwise_statistics(x, stride, [branches[i] for i in members], channels)):
            out[i] = stats
    for (shape, stride, padding, dilation, groups, _), members in wide.items():
        weights = [branches[i].weight for i in members]
        biases = [branches[i].bias for i in members]
        for i, stats in zip(members, _wide_conv_statistics(x, weights, biases, stride, padding, dilation, groups)):
            out[i] = stats
    return out


def _covariance_or_conv(x: torch.Tensor, stride: tuple[int, int], branches: Sequence[Branch], members: list[int],
                        wide: dict[tuple, list[int]]) -> list[int]:
    """The 1x1 branches of ``members`` whose statistics are cheaper from a convolution go to ``wide``.

    From the covariance, multiply-adds are ``C^2 (M + sum O)`` (``M`` pixels, ``C`` channels per
    group) against ``M C sum O`` for the convolutions: the covariance wins on large images, the
    convs when there are fewer pixels than channels (the last stages at 64x64). Identity and
    depthwise branches only need the channel moments and always stay.
    """
    dense = [i for i in members if branches[i].weight is not None and branches[i].weight.shape[1] > 1]
    if not dense:
        return members
    pixels = x.shape[0] * len(range(0, x.shape[2], stride[0])) * len(range(0, x.shape[3], stride[1]))
    per_group = max(branches[i].weight.shape[1] for i in dense)
    outputs = sum(branches[i].weight.shape[0] for i in dense)
    if per_group * (pixels + outputs) < pixels * outputs:
        return members
    for i in dense:
        wide.setdefault(_geometry(branches[i]), []).append(i)
    return [i for i in members if i not in dense]


def _geometry(branch: Branch) -> tuple:
    """What branches computed by one wide conv share: kernel shape, stride, padding, dilation,
    groups and whether they have a bias."""
    return (tuple(branch.weight.shape), tuple(branch.stride), branch.padding, tuple(branch.dilation), branch.groups,
            branch.bias is not None)


class _Covariance(torch.autograd.Function):
    """Row means and covariance ``(X - mu)(X - mu)^T / M`` of ``X`` ``[C, M]``; backward is one product,
    ``dX = ((dCov + dCov^T) (X - mu) + dmu) / M`` (the centred rows sum to zero)."""

    @staticmethod
    def forward(ctx, flat):  # type: ignore[override]
        count = flat.shape[1]
        mean = flat.mean(dim=1)
        centred = flat - mean[:, None]
        cov = torch.mm(centred, centred.t()).div_(count)
        ctx.save_for_backward(centred)
        return mean, cov

    @staticmethod
    def backward(ctx, dmean, dcov):  # type: ignore[override]
        (centred,) = ctx.saved_tensors
        count = centred.shape[1]
        return torch.addmm(dmean[:, None], dcov + dcov.t(), centred).div_(count)


class _RowQuadratic(torch.autograd.Function):
    """``w_o^T S w_o`` for every row of ``w`` ``[O, C]`` and a symmetric ``S`` ``[C, C]``."""

    @staticmethod
    def forward(ctx, w, sym):  # type: ignore[override]
        product = torch.mm(w, sym)
        ctx.save_for_backward(w, product)
        return (product * w).sum(dim=1)

    @staticmethod
    def backward(ctx, dvar):  # type: ignore[override]
        w, product = ctx.saved_tensors
        dw = product * (2 * dvar)[:, None] if ctx.needs_input_grad[0] else None
        dsym = torch.mm((w * dvar[:, None]).t(), w) if ctx.needs_input_grad[1] else None
        return dw, dsym


def _pointwise_statistics(x: torch.Tensor, stride: tuple[int, int], branches: Sequence[Branch],
                          channels: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Exact statistics of identity and padding-free 1x1 branches from the input's mean and covariance.

    A 1x1 conv reads the input pixels ``x[:, :, ::s, ::s]`` one at a time, so its output channel
    ``o`` has mean ``w_o . mu + b_o`` and variance ``w_o^T Cov w_o`` over those pixels: one
    ``C x C`` covariance replaces the convolutions, their backward and the moments of
    their outputs. Grouped kernels read the diagonal blocks of ``Cov``; depthwise ones only its
    diagonal, which is then all that is computed.
    """
    xs = x if stride == (1, 1) else x[:, :, ::stride[0], ::stride[1]]
    count = xs.numel() // channels
    dense = any(b.weight is not None and b.weight.shape[1] > 1 for b in branches)
    if dense:
        mean_x, cov = _Covariance.apply(xs.transpose(0, 1).reshape(channels, -1))
        var_x = torch.diagonal(cov)
    else:
        mean_x, var_x = channel_moments(xs)
    out = []
    for weight, bias, groups in ((b.weight, b.bias, b.groups) for b in branches):
        if weight is None:
            out.append((mean_x, var_x, count))
            continue
        o, per_group = weight.shape[0], weight.shape[1]
        w = weight.reshape(o, per_group)
        if per_group == 1:  # depthwise (with a channel multiplier), or a single input channel
            mean = w[:, 0] * per_input_channel(mean_x, o, groups)[:, 0]
            var = w[:, 0].square() * per_input_channel(var_x, o, groups)[:, 0]
        elif groups == 1:
            mean = torch.mv(w, mean_x)
            var = _RowQuadratic.apply(w, cov)
        else:
            blocks = cov.reshape(groups, per_group, groups, per_group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            wg = w.reshape(groups, o // groups, per_group)
            mean = (w * per_input_channel(mean_x, o, groups)).sum(dim=1)
            var = (torch.bmm(wg, blocks) * wg).sum(dim=2).reshape(o)
        if bias is not None:
            mean = mean + bias
        out.append((mean, var, count))
    return out


def _wide_conv_statistics(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Any],
                          stride: tuple[int, int], padding: Pads, dilation: tuple[int, int],
                          groups: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Statistics of convs of one geometry on ``x``: one conv with the kernels side by side, one pass of channel moments."""
    n = len(weights)
    o = weights[0].shape[0]
    if n == 1:
        weight, bias = weights[0], biases[0]
    elif groups == 1:
        weight = torch.cat(list(weights), dim=0)
        bias = None if biases[0] is None else torch.cat(list(biases), dim=0)
    else:  # outputs of one group stay together: [groups, branch, out per group]
        shape = weights[0].shape
        weight = torch.stack([w.reshape(groups, o // groups, *shape[1:]) for w in weights], dim=1)
        weight = weight.reshape(n * o, *shape[1:])
        bias = None if biases[0] is None else torch.stack(
            [b.reshape(groups, o // groups) for b in biases], dim=1).reshape(n * o)
    y = F.conv2d(x, weight, bias, stride, (padding[0][0], padding[1][0]), dilation, groups)
    mean, var = channel_moments(y)
    count = y.numel() // y.shape[1]
    if n == 1:
        return [(mean, var, count)]
    if groups == 1:
        means, variances = mean.reshape(n, o), var.reshape(n, o)
    else:
        means = mean.reshape(groups, n, o // groups).transpose(0, 1).reshape(n, o)
        variances = var.reshape(groups, n, o // groups).transpose(0, 1).reshape(n, o)
    return [(m, v, count) for m, v in zip(means.unbind(0), variances.unbind(0))]


__all__ = ["Moments", "batch_many", "batch_one", "batch_statistics", "channel_moments"]
