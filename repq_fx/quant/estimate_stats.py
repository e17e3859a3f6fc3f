"""Estimated statistics of the branches of one block input (``bn_mode="estimate"``, RepQ-BNEst).

No branch conv runs: the mean of ``branch(x)`` is ``W @ E[x] + b`` (exact away from borders) and its
variance ``sum W^2 Var[x]`` (a diagonal input covariance), from the block input's per-channel
moments, computed once per block (``input_moments``); every branch's estimate is one
matrix-vector product on the stacked kernels.

>>> x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
>>> (mean, var, count), = estimate_many(x, [IDENTITY])
>>> bool(torch.allclose(mean, x.mean((0, 2, 3)))), count
(True, 100)
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..algebra.kernels import per_input_channel
from .batch_stats import Moments, channel_moments
from .branch import IDENTITY, Branch
from .precision import float32_function
from .sync_stats import sync_group, sync_moments


@float32_function  # float32 under autocast: the statistics are folded into the weight grid
def input_moments(x: torch.Tensor, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, biased var)`` of ``x`` in train mode (empty tensors in eval mode: unused).

    >>> mean, var = input_moments(torch.ones(2, 3, 4, 4), nn.BatchNorm2d(3))
    >>> mean.tolist(), var.tolist()
    ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    """
    if not bn.training:
        empty = x.new_empty(0)
        return empty, empty
    mean, var = channel_moments(x)
    (mean, var, _), = sync_moments([(mean, var, x.numel() // x.shape[1])], sync_group([bn]))
    return mean, var


def estimate_one(x: torch.Tensor, branch: Branch, bn: nn.Module, moments: Any = None) -> Moments:
    """Estimated ``(mean, var, count)`` of ``branch(x)``; ``moments``: the block input's ``input_moments``
    (computed here when ``None``), of the global batch for a synchronising BN, and so is the count.

    >>> branch = Branch(torch.full((1, 2, 1, 1), 0.5), None, (1, 1), ((0, 0), (0, 0)), (1, 1), 1)
    >>> mean, var, count = estimate_one(torch.ones(2, 2, 3, 3), branch, nn.BatchNorm2d(1))
    >>> mean.tolist(), count
    ([1.0], 18)
    """
    mean_x, var_x = moments if moments is not None else input_moments(x, bn)
    mean, var, count = _estimate(x, mean_x, var_x, branch)
    group = sync_group([bn])  # input_moments were of the global batch: so is the count
    count *= 1 if group is None else torch.distributed.get_world_size(group)
    return mean, var, count


def estimate_many(x: torch.Tensor, branches: Sequence[Branch], group: Any = None) -> list[Moments]:
    """``_estimate`` of each branch, from one ``channel_moments`` of ``x`` (of the global batch when
    ``group`` is a process group, see ``sync_stats``); kernels of one shape together."""
    mean_x, var_x = channel_moments(x)
    local = x.numel() // x.shape[1]
    (mean_x, var_x, total), = sync_moments([(mean_x, var_x, local)], group)
    share = total / local  # the global batch over this process's (1 without a group): counts of the global batch
    out: list[Any] = [None] * len(branches)
    stacks: dict[tuple, list[int]] = {}
    for i, branch in enumerate(branches):
        if branch.weight is None:
            out[i] = (mean_x, var_x, total)
        else:
            stacks.setdefault((tuple(branch.weight.shape), branch.groups), []).append(i)
    for (shape, groups), members in stacks.items():
        means, variances = _estimate_moments([branches[i].weight for i in members], mean_x, var_x, groups)
        for i, mean, var in zip(members, means.unbind(0), variances.unbind(0)):
            bias = branches[i].bias
            mean = mean if bias is None else mean + bias
            out[i] = (mean, var, round(_count(x, branches[i]) * share))
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


def _count(x: torch.Tensor, branch: Branch) -> int:
    """Output pixels (times batch) of the conv map: the sample count of the BN's variance."""
    sizes = []
    for dim, n in enumerate(x.shape[2:]):
        (p0, p1), d = branch.padding[dim], branch.dilation[dim]
        k, s = branch.weight.shape[2 + dim], branch.stride[dim]
        sizes.append((n + p0 + p1 - d * (k - 1) - 1) // s + 1)
    return x.shape[0] * sizes[0] * sizes[1]


def _estimate(x: torch.Tensor, mean_x: torch.Tensor, var_x: torch.Tensor, branch: Branch) -> Moments:
    """Estimated ``(mean, var, count)`` of one branch from the input moments (of this process)."""
    if branch.weight is None:
        return mean_x, var_x, x.numel() // x.shape[1]
    mean, var = _estimate_moments([branch.weight], mean_x, var_x, branch.groups)
    mean, var = mean[0], var[0]
    if branch.bias is not None:
        mean = mean + branch.bias
    return mean, var, _count(x, branch)


__all__ = ["estimate_many", "estimate_one", "input_moments"]
