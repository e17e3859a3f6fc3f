"""The statistics a BatchNorm inside a block normalizes with, for the three ``bn_mode`` s.

``branch_statistics`` returns ``(mean, var)`` of the tensor a BN sees, where that tensor
is the affine conv map ``(weight, bias, geometry)`` of the block input ``x``:

- eval mode, or ``"running"``: the running statistics;
- ``"batch"`` (RepQ-BN): exact batch statistics of the branch, computed in float;
- ``"estimate"`` (RepQ-BNEst): no branch conv; the mean is ``W @ E[x] + b`` (exact away from
  borders) and the variance ``sum W^2 Var[x]`` (a diagonal input covariance).

In train mode the BN's running statistics are updated exactly as ``nn.BatchNorm2d``
would (momentum or cumulative average, unbiased variance, ``num_batches_tracked``).

``block_statistics`` computes the statistics of all BNs that read one block input at once
(``prepare`` routes each BN's ``branch_statistics`` through it): in ``"batch"`` mode the
branch convs of one geometry run as ONE wide conv (their kernels concatenated along the
output channels) and one pass of channel moments, and the padding-free 1x1 branches and the identity
need no conv at all: their exact statistics follow from the input's channel mean and
covariance (``Var[w.x] = w^T Cov(x) w``), one ``C x C`` product for all of them. In
``"estimate"`` mode the input moments are computed once and every branch's estimate is one
matrix-vector product on the stacked kernels.

>>> bn = torch.nn.BatchNorm2d(2)
>>> x = torch.randn(4, 2, 5, 5)
>>> mean, var = branch_statistics(x, None, None, (1, 1), ((0, 0), (0, 0)), (1, 1), 1, None, bn, "batch")
>>> bool(torch.allclose(mean, x.mean((0, 2, 3)))), int(bn.num_batches_tracked)
(True, 1)
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..algebra import AffineConv, apply
from ..algebra.kernels import per_input_channel
from .precision import float32_function
from .sync_stats import sync_group, sync_moments

Pads = tuple[tuple[int, int], tuple[int, int]]
# (weight, bias, stride, padding, dilation, groups, pad_value): the affine conv map a BN reads
Branch = tuple[Any, Any, tuple[int, int], Pads, tuple[int, int], int, Any]


class BranchStatistics(NamedTuple):
    """Statistics ``block_statistics`` computed for one BN (running statistics already updated),
    with the BN's folded ``scale`` and ``shift`` (see ``bn_fold``) when they were computed together
    with other BNs of the block."""

    mean: torch.Tensor
    var: torch.Tensor
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None


def bn_fold(stats: Sequence[torch.Tensor], weight: torch.Tensor | None, bias: torch.Tensor | None,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """R1: a BN with statistics ``stats = (mean, var)`` as ``y = scale * x + shift``.

    ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale`` (``weight``/``bias`` ``None``:
    ``affine=False``), as ``algebra.ops.batch_norm`` computes them; taken from ``stats`` when
    ``block_statistics`` already folded this BN together with the others of its block.

    >>> scale, shift = bn_fold((torch.tensor([1.0]), torch.tensor([3.0])), torch.tensor([2.0]), None, 1.0)
    >>> scale.item(), shift.item()
    (1.0, -1.0)
    """
    if isinstance(stats, BranchStatistics) and stats.scale is not None:
        return stats.scale, stats.shift
    mean, var = stats[0], stats[1]
    inv_std = torch.rsqrt(var + eps)
    scale = inv_std if weight is None else weight * inv_std
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


@float32_function  # float32 under autocast: the statistics are folded into the weight grid
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
    moments: tuple[torch.Tensor, torch.Tensor] | BranchStatistics | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, var)`` the BN normalizes with; updates its running statistics in train mode.

    ``moments`` are the block input's per-channel ``(mean, var)`` (``input_moments``), shared by all
    BNs of a block in ``"estimate"`` mode; or this BN's :class:`BranchStatistics` from
    ``block_statistics``, returned as they are.
    """
    if not bn.training or mode == "running":
        return bn.running_mean, bn.running_var
    if isinstance(moments, BranchStatistics):
        return moments
    if mode == "batch":
        y = x if weight is None else apply(AffineConv(weight, bias, stride, padding, dilation, groups, pad_value), x)
        mean, var = channel_moments(y)
        count = y.numel() // y.shape[1]
        (mean, var, count), = sync_moments([(mean, var, count)], sync_group([bn]))  # SyncBatchNorm: global batch
    elif mode == "estimate":
        mean_x, var_x = moments if moments is not None else input_moments(x, bn)
        mean, var, count = _estimate(x, mean_x, var_x, weight, bias, stride, padding, dilation, groups)
        group = sync_group([bn])  # input_moments were of the global batch: so is the count
        count *= 1 if group is None else torch.distributed.get_world_size(group)
    else:
        raise AssertionError(f"unknown bn_mode {mode!r}")
    _update_running([bn], [mean], [var], [count])
    return mean, var


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance over ``(N, H, W)``, two passes (mean, then centred squares).

    Same values as ``torch.var_mean(x, (0, 2, 3), unbiased=False)`` to rounding, and its exact
    gradient ``(dmean + 2 (x - mean) dvar) / M``, but 5-10x faster on the CPU, where
    ``var_mean`` over the non-contiguous ``(0, 2, 3)`` runs a scalar Welford loop.
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


@float32_function  # float32 under autocast: the statistics are folded into the weight grid
def input_moments(x: torch.Tensor, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, biased var)`` of ``x`` in train mode (empty tensors in eval mode: unused)."""
    if not bn.training:
        empty = x.new_empty(0)
        return empty, empty
    mean, var = channel_moments(x)
    (mean, var, _), = sync_moments([(mean, var, x.numel() // x.shape[1])], sync_group([bn]))
    return mean, var


@float32_function  # float32 under autocast: the statistics are folded into the weight grid
def block_statistics(x: torch.Tensor, branches: Sequence[Branch], bns: Sequence[nn.Module],
                     mode: str) -> tuple[BranchStatistics | None, ...]:
    """The statistics of every BN in ``bns`` (BN ``i`` reads ``branches[i]`` of ``x``), computed together.

    Equal to calling ``branch_statistics`` for each (same running-statistics updates); ``None``
    for a BN that uses its running statistics (eval mode, ``"running"``).
    """
    live = [i for i, bn in enumerate(bns) if bn.training and mode != "running"]
    out: list[BranchStatistics | None] = [None] * len(bns)
    if not live:
        return tuple(out)
    live_bns = [bns[i] for i in live]
    group = sync_group(live_bns)  # SyncBatchNorm in a process group: statistics of the global batch
    if mode == "batch":
        stats = sync_moments(_batch_statistics(x, [branches[i] for i in live]), group)
    elif mode == "estimate":
        stats = _estimated_statistics(x, [branches[i] for i in live], group)
    else:
        raise AssertionError(f"unknown bn_mode {mode!r}")
    _update_running(live_bns, [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats])
    folds = _fold_together(live_bns, [s[0] for s in stats], [s[1] for s in stats])
    for i, (mean, var, _), (scale, shift) in zip(live, stats, folds):
        out[i] = BranchStatistics(mean, var, scale, shift)
    return tuple(out)


def _fold_together(bns: Sequence[nn.Module], means: Sequence[torch.Tensor],
                   variances: Sequence[torch.Tensor]) -> list[tuple[Any, Any]]:
    """``bn_fold`` of BNs of one width as one stacked computation (``(None, None)`` for a BN left alone).

    A MobileOne block has six BNs of one width: their folds (and the backward of the folds) run
    as one set of ops instead of six.
    """
    out: list[tuple[Any, Any]] = [(None, None)] * len(bns)
    groups: dict[tuple, list[int]] = {}
    for i, (bn, mean) in enumerate(zip(bns, means)):
        key = (tuple(mean.shape), mean.dtype, float(bn.eps), bn.weight is None, bn.bias is None,
               None if bn.weight is None else bn.weight.dtype)
        groups.setdefault(key, []).append(i)
    for (_, _, eps, no_weight, no_bias, _), members in groups.items():
        if len(members) < 2:
            continue
        mean = torch.stack([means[i] for i in members])
        inv_std = torch.rsqrt(torch.stack([variances[i] for i in members]) + eps)
        scale = inv_std if no_weight else torch.stack([bns[i].weight for i in members]) * inv_std
        shift = -mean * scale if no_bias else torch.stack([bns[i].bias for i in members]) - mean * scale
        for i, sc, sh in zip(members, scale.unbind(0), shift.unbind(0)):
            out[i] = (sc, sh)
    return out


# ----------------------------------------------------------------- batch statistics of many branches

def _batch_statistics(x: torch.Tensor, branches: Sequence[Branch]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Exact batch ``(mean, var, count)`` of each branch output."""
    out: list[Any] = [None] * len(branches)
    pointwise: dict[tuple[int, int], list[int]] = {}  # stride -> branches computed from Cov(x)
    wide: dict[tuple, list[int]] = {}  # conv geometry -> branches computed by one wide conv
    channels = x.shape[1]
    for i, (weight, bias, stride, padding, dilation, groups, pad_value) in enumerate(branches):
        if weight is None:
            pointwise.setdefault((1, 1), []).append(i)
        elif tuple(weight.shape[2:]) == (1, 1) and padding == ((0, 0), (0, 0)):
            pointwise.setdefault(tuple(stride), []).append(i)
        elif pad_value is None and padding[0][0] == padding[0][1] >= 0 and padding[1][0] == padding[1][1] >= 0:
            key = (tuple(weight.shape), tuple(stride), padding, tuple(dilation), groups, bias is not None)
            wide.setdefault(key, []).append(i)
        else:
            y = apply(AffineConv(weight, bias, stride, padding, dilation, groups, pad_value), x)
            mean, var = channel_moments(y)
            out[i] = (mean, var, y.numel() // y.shape[1])
    for stride, members in pointwise.items():
        members = _covariance_or_conv(x, stride, branches, members, wide)
        for i, stats in zip(members, _pointwise_statistics(x, stride, [branches[i] for i in members], channels)):
            out[i] = stats
    for (shape, stride, padding, dilation, groups, _), members in wide.items():
        weights = [branches[i][0] for i in members]
        biases = [branches[i][1] for i in members]
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
    dense = [i for i in members if branches[i][0] is not None and branches[i][0].shape[1] > 1]
    if not dense:
        return members
    pixels = x.shape[0] * len(range(0, x.shape[2], stride[0])) * len(range(0, x.shape[3], stride[1]))
    per_group = max(branches[i][0].shape[1] for i in dense)
    outputs = sum(branches[i][0].shape[0] for i in dense)
    if per_group * (pixels + outputs) < pixels * outputs:
        return members
    for i in dense:
        weight, bias, stride_, padding, dilation, groups, _ = branches[i]
        key = (tuple(weight.shape), tuple(stride_), padding, tuple(dilation), groups, bias is not None)
        wide.setdefault(key, []).append(i)
    return [i for i in members if i not in dense]


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
    dense = any(w is not None and w.shape[1] > 1 for w, *_ in branches)
    if dense:
        mean_x, cov = _Covariance.apply(xs.transpose(0, 1).reshape(channels, -1))
        var_x = torch.diagonal(cov)
    else:
        mean_x, var_x = channel_moments(xs)
    out = []
    for weight, bias, _, _, _, groups, _ in branches:
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


# ----------------------------------------------------------------- estimated statistics

def _estimated_statistics(x: torch.Tensor, branches: Sequence[Branch],
                          group: Any = None) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """``_estimate`` of each branch, from one ``channel_moments`` of ``x`` (of the global batch when
    ``group`` is a process group, see ``sync_stats``); kernels of one shape together."""
    mean_x, var_x = channel_moments(x)
    local = x.numel() // x.shape[1]
    (mean_x, var_x, total), = sync_moments([(mean_x, var_x, local)], group)
    share = total / local  # the global batch over this process's (1 without a group): counts of the global batch
    out: list[Any] = [None] * len(branches)
    stacks: dict[tuple, list[int]] = {}
    for i, (weight, *_rest) in enumerate(branches):
        if weight is None:
            out[i] = (mean_x, var_x, total)
        else:
            stacks.setdefault((tuple(weight.shape), branches[i][5]), []).append(i)
    for (shape, groups), members in stacks.items():
        means, variances = _estimate_moments([branches[i][0] for i in members], mean_x, var_x, groups)
        for i, mean, var in zip(members, means.unbind(0), variances.unbind(0)):
            weight, bias, stride, padding, dilation, groups, _ = branches[i]
            mean = mean if bias is None else mean + bias
            out[i] = (mean, var, round(_count(x, weight, stride, padding, dilation) * share))
    return out


class _TapMoments(torch.autograd.Function):
    """For kernels ``w_b`` ``[R, J, T]`` (rows, input channels a row reads, taps) and input moments
    ``M``, ``V`` (``[R, J]``, or ``[J]`` shared by all rows): ``mean_b[r] = sum_{j,t} w_b[r,j,t] M[r,j]``
    and ``var_b[r] = sum_{j,t} w_b[r,j,t]^2 V[r,j]``, stacked ``[B, R]``.

    The taps are summed first (``S1 = sum_t w``, ``S2 = sum_t w^2``, ``[R, J]``); backward writes
    ``dw = dmean M + 2 w (dvar V)`` into one buffer per kernel. The kernels are taken as they are
    (no stacked copy kept for backward); 1x1 kernels recompute ``w^2`` in backward rather than
    keep a kernel-sized ``S2``.
    """

    @staticmethod
    def forward(ctx, m, v, *weights):  # type: ignore[override]
        means, variances, sums = [], [], []
        for w in weights:
            rows, cols, taps = w.shape
            if taps == 1:
                s1 = w.reshape(rows, cols)
                s2 = s1.square()
            else:
                flat = w.reshape(rows * cols, taps)
                ones = w.new_ones(taps)
                s1 = torch.mv(flat, ones).reshape(rows, cols)
                s2 = torch.mv(flat.square(), ones).reshape(rows, cols)  # twice as fast as vecdot here
                sums += [s1, s2]
            if m.dim() == 1:
                means.append(torch.mv(s1, m))
                variances.append(torch.mv(s2, v))
            else:
                means.append((s1 * m).sum(dim=1))
                variances.append((s2 * v).sum(dim=1))
        ctx.save_for_backward(m, v, *weights, *sums)
        ctx.count = len(weights)
        return torch.stack(means), torch.stack(variances)

    @staticmethod
    def backward(ctx, dmeans, dvars):  # type: ignore[override]
        saved = ctx.saved_tensors
        m, v, weights, sums = saved[0], saved[1], saved[2:2 + ctx.count], list(saved[2 + ctx.count:])
        dm = torch.zeros_like(m) if ctx.needs_input_grad[0] else None
        dv = torch.zeros_like(v) if ctx.needs_input_grad[1] else None
        dweights = []
        for b, w in enumerate(weights):
            dmean, dvar = dmeans[b], dvars[b]
            rows, cols, taps = w.shape
            if taps == 1:
                flat = w.reshape(rows, cols)
                s1, buf = flat, flat.square()
            else:
                s1, s2 = sums.pop(0), sums.pop(0)
                buf = None
            if dm is not None:
                dm += torch.mv(s1.t(), dmean) if m.dim() == 1 else dmean[:, None] * s1
            if dv is not None:
                s2_ = buf if taps == 1 else s2
                dv += torch.mv(s2_.t(), dvar) if v.dim() == 1 else dvar[:, None] * s2_
            if not ctx.needs_input_grad[2 + b]:
                dweights.append(None)
                continue
            v_rows = v if v.dim() == 2 else v.expand(rows, -1)
            m_rows = m if m.dim() == 2 else m.expand(rows, -1)
            if taps == 1:  # dw = 2 dvar V w + dmean M, in the buffer of w^2
                torch.mul(flat, (2 * dvar)[:, None], out=buf)
                buf.mul_(v_rows)
                if m.dim() == 1:
                    buf.addr_(dmean, m)
                else:
                    buf.addcmul_(dmean[:, None].expand(rows, cols), m_rows)
                dweights.append(buf.reshape(w.shape))
            else:
                a = (2 * dvar)[:, None] * v_rows
                c = dmean[:, None] * m_rows
                dweights.append(torch.addcmul(c.unsqueeze(2), w, a.unsqueeze(2)))
        return (dm, dv, *dweights)


def _estimate_moments(weights: Sequence[torch.Tensor], mean_x: torch.Tensor, var_x: torch.Tensor,
                      groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_{i,u,v} W[o,i,u,v] E[x_i]`` and ``sum W^2 Var[x_i]`` for kernels ``[O, I/g, kh, kw]`` of one shape,
    stacked ``[B, O]`` (see ``_TapMoments``; grouped kernels read the channel moments in
    ``per_input_channel`` layout)."""
    o, per_group, kh, kw = weights[0].shape
    if groups > 1:
        mean_x = per_input_channel(mean_x, o, groups)
        var_x = per_input_channel(var_x, o, groups)
    return _TapMoments.apply(mean_x, var_x, *[w.reshape(o, per_group, kh * kw) for w in weights])


def _count(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> int:
    """Output pixels (times batch) of the conv map: the sample count of the BN's variance."""
    sizes = []
    for dim, n in enumerate(x.shape[2:]):
        (p0, p1), d, k, s = padding[dim], dilation[dim], weight.shape[2 + dim], stride[dim]
        sizes.append((n + p0 + p1 - d * (k - 1) - 1) // s + 1)
    return x.shape[0] * sizes[0] * sizes[1]


def _estimate(x, mean_x, var_x, weight, bias, stride, padding, dilation, groups):
    if weight is None:
        return mean_x, var_x, x.numel() // x.shape[1]
    mean, var = _estimate_moments([weight], mean_x, var_x, groups)
    mean, var = mean[0], var[0]
    if bias is not None:
        mean = mean + bias
    return mean, var, _count(x, weight, stride, padding, dilation)


def _update_running(bns: Sequence[nn.Module], means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor],
                    counts: Sequence[int]) -> None:
    """``nn.BatchNorm2d``'s running-statistics update for each BN (momentum or cumulative average).

    BNs with the same factor and dtype are updated together with ``torch._foreach_*`` ops (a
    MobileOne block has six BNs; one op each instead of six).
    """
    with torch.no_grad():
        tracked = [(bn, m, v, c) for bn, m, v, c in zip(bns, means, variances, counts)
                   if bn.track_running_stats and bn.running_mean is not None]
        if not tracked:
            return
        torch._foreach_add_([bn.num_batches_tracked for bn, *_ in tracked], 1)
        groups: dict[tuple, list[tuple]] = {}
        for bn, mean, var, count in tracked:
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            same = mean.dtype == bn.running_mean.dtype == var.dtype == bn.running_var.dtype
            key = (factor, bn.running_mean.dtype, bn.running_mean.device) if same else (factor, id(bn))
            groups.setdefault(key, []).append((bn, mean.detach(), var.detach(), count))
        for (factor, *_), members in groups.items():
            running_means = [bn.running_mean for bn, *_ in members]
            running_vars = [bn.running_var for bn, *_ in members]
            batch_means = [m.to(bn.running_mean.dtype) for bn, m, _, _ in members]
            unbiased = torch._foreach_mul([v.to(bn.running_var.dtype) for bn, _, v, _ in members],
                                          [c / max(c - 1, 1) for *_, c in members])
            torch._foreach_mul_(running_means, 1 - factor)
            torch._foreach_add_(running_means, batch_means, alpha=factor)
            torch._foreach_mul_(running_vars, 1 - factor)
            torch._foreach_add_(running_vars, unbiased, alpha=factor)


__all__ = ["branch_statistics", "block_statistics", "bn_fold", "BranchStatistics", "input_moments"]
