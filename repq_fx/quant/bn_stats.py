"""The statistics a BatchNorm inside a block normalizes with, for the three ``BnMode`` s.

``branch_statistics`` returns ``(mean, var)`` of the tensor a BN sees, ``branch(x)``: the affine
conv map :class:`~repq_fx.quant.branch.Branch` of the block input ``x``:

- eval mode, or ``BnMode.RUNNING``: the running statistics;
- ``BnMode.BATCH`` (RepQ-BN): exact batch statistics of the branch, computed in float
  (``batch_stats``);
- ``BnMode.ESTIMATE`` (RepQ-BNEst): no branch conv; the mean is ``W @ E[x] + b`` (exact away from
  borders) and the variance ``sum W^2 Var[x]`` (a diagonal input covariance; ``estimate_stats``).

Each train-mode ``BnMode`` is a :class:`_Strategy`: how to compute one branch's statistics and
how to compute those of all the BNs that read one block input together (``block_statistics``,
which ``prepare`` routes each BN's ``branch_statistics`` through). In train mode the BN's running
statistics are updated exactly as ``nn.BatchNorm2d`` would (momentum or cumulative average,
unbiased variance, ``num_batches_tracked``).

>>> bn = torch.nn.BatchNorm2d(2)
>>> x = torch.randn(4, 2, 5, 5)
>>> mean, var = branch_statistics(x, IDENTITY, bn, BnMode.BATCH)
>>> bool(torch.allclose(mean, x.mean((0, 2, 3)))), int(bn.num_batches_tracked)
(True, 1)
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn as nn

from ..algebra.ops import bn_scale_shift
from ..config import BnMode
from .batch_stats import Moments, batch_many, batch_one, channel_moments
from .branch import IDENTITY, Branch, from_legacy
from .estimate_stats import estimate_many, estimate_one, input_moments
from .precision import float32_function
from .sync_stats import sync_group


class BranchStatistics(NamedTuple):
    """Statistics ``block_statistics`` computed for one BN (running statistics already updated),
    with the BN's folded ``scale`` and ``shift`` (see ``bn_fold``) when they were computed together
    with other BNs of the block."""

    mean: torch.Tensor
    var: torch.Tensor
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None


class _Strategy(NamedTuple):
    """How a train-mode ``BnMode`` computes ``(mean, var, count)``: of one branch (``one(x, branch, bn,
    moments)``), and of several branches of one input together (``many(x, branches, group)``, same
    values; ``group``: the process group of synchronising BNs or ``None``)."""

    one: Callable[[torch.Tensor, Branch, nn.Module, Any], Moments]
    many: Callable[[torch.Tensor, Sequence[Branch], Any], list[Moments]]


# the modes that compute statistics in train mode; the others (RUNNING) read the running ones
_STRATEGIES: dict[BnMode, _Strategy] = {
    BnMode.BATCH: _Strategy(batch_one, batch_many),
    BnMode.ESTIMATE: _Strategy(estimate_one, estimate_many),
}


def _strategy(bn: nn.Module, mode: BnMode | str) -> _Strategy | None:
    """The strategy of ``mode`` for ``bn`` now; ``None`` where it uses its running statistics."""
    if mode not in _STRATEGIES and mode != BnMode.RUNNING:
        raise AssertionError(f"unknown bn_mode {mode!r}")
    return _STRATEGIES.get(mode) if bn.training else None  # type: ignore[call-overload]


def bn_fold(stats: Sequence[torch.Tensor], weight: torch.Tensor | None, bias: torch.Tensor | None,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """R1: a BN with statistics ``stats = (mean, var)`` as ``y = scale * x + shift`` (``algebra.ops.bn_scale_shift``;
    ``weight``/``bias`` ``None``: ``affine=False``); taken from ``stats`` when ``block_statistics``
    already folded this BN together with the others of its block.

    >>> scale, shift = bn_fold((torch.tensor([1.0]), torch.tensor([3.0])), torch.tensor([2.0]), None, 1.0)
    >>> scale.item(), shift.item()
    (1.0, -1.0)
    """
    if isinstance(stats, BranchStatistics) and stats.scale is not None:
        return stats.scale, stats.shift
    return bn_scale_shift(stats[0], stats[1], weight, bias, eps)


@float32_function  # float32 under autocast: the statistics are folded into the weight grid
def branch_statistics(x: torch.Tensor, branch: Branch, bn: nn.Module, mode: BnMode | str,
                      moments: tuple[torch.Tensor, torch.Tensor] | BranchStatistics | None = None, *legacy: Any,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, var)`` the BN normalizes with; updates its running statistics in train mode.

    ``moments`` are the block input's per-channel ``(mean, var)`` (``input_moments``), shared by all
    BNs of a block in ``BnMode.ESTIMATE``; or this BN's :class:`BranchStatistics` from
    ``block_statistics``, returned as they are. ``legacy``: the rest of a call in the layout of graphs
    saved before :class:`Branch` (``quant.branch.from_legacy``).
    """
    if legacy:
        x, branch, bn, mode, moments = from_legacy((x, branch, bn, mode, moments, *legacy))
    strategy = _strategy(bn, mode)
    if strategy is None:
        return bn.running_mean, bn.running_var
    if isinstance(moments, BranchStatistics):
        return moments
    mean, var, count = strategy.one(x, branch, bn, moments)
    _update_running([bn], [mean], [var], [count])
    return mean, var


@float32_function  # float32 under autocast: the statistics are folded into the weight grid
def block_statistics(x: torch.Tensor, branches: Sequence[Branch], bns: Sequence[nn.Module],
                     mode: BnMode | str) -> tuple[BranchStatistics | None, ...]:
    """The statistics of every BN in ``bns`` (BN ``i`` reads ``branches[i]`` of ``x``), computed together.

    Equal to calling ``branch_statistics`` for each (same running-statistics updates); ``None``
    for a BN that uses its running statistics (eval mode, ``BnMode.RUNNING``).

    >>> bns = [torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2).eval()]
    >>> [s is None for s in block_statistics(torch.randn(2, 2, 3, 3), [IDENTITY, IDENTITY], bns, "batch")]
    [False, True]
    """
    branches = [b if isinstance(b, Branch) else Branch(*b) for b in branches]  # plain tuples: an older saved graph
    strategies = [_strategy(bn, mode) for bn in bns]
    live = [i for i, strategy in enumerate(strategies) if strategy is not None]
    out: list[BranchStatistics | None] = [None] * len(bns)
    if not live:
        return tuple(out)
    live_bns = [bns[i] for i in live]
    group = sync_group(live_bns)  # SyncBatchNorm in a process group: statistics of the global batch
    stats = strategies[live[0]].many(x, [branches[i] for i in live], group)
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
        weight = None if no_weight else torch.stack([bns[i].weight for i in members])
        bias = None if no_bias else torch.stack([bns[i].bias for i in members])
        scale, shift = bn_scale_shift(torch.stack([means[i] for i in members]),
                                      torch.stack([variances[i] for i in members]), weight, bias, eps)
        for i, sc, sh in zip(members, scale.unbind(0), shift.unbind(0)):
            out[i] = (sc, sh)
    return out


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


__all__ = ["BnMode", "Branch", "BranchStatistics", "IDENTITY", "block_statistics", "bn_fold", "branch_statistics",
           "channel_moments", "input_moments"]
