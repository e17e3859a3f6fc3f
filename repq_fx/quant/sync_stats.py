"""BN statistics over all processes, for ``nn.SyncBatchNorm`` layers inside RepQ blocks (and alone).

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` before ``prepare``, or :func:`mark_sync_batch_norm`
on the prepared model (plain BN modules, which DDP accepts on the CPU where it refuses
SyncBatchNorm), marks which BNs synchronise.
Inside a merged block a BN never runs as a module: ``bn_stats`` computes its batch statistics
(``bn_mode="batch"``) or estimates them from the block input's moments (``"estimate"``). For a
SyncBatchNorm in train mode, inside a process group of more than one process, those per-process
``(mean, biased var, count)`` are combined into the statistics of the global batch, as
SyncBatchNorm does: the global mean ``M = sum_r c_r m_r / N`` and variance
``sum_r c_r (v_r + (m_r - M)^2) / N`` (the parallel-variance formula, no ``E[x^2] - M^2``
cancellation), with ``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the
gradients, so every process's loss reaches every process's batch. The running statistics are then
updated with the global values and count (unbiased with ``N``), identical on all ranks.

:func:`sync_group` says whether a set of BNs synchronises (None: no); :func:`sync_moments` combines.
torch's own SyncBatchNorm runs on CUDA only; these functions run on any device (gloo on the CPU),
and :func:`repq_fx.ir.batch_norm` uses them for a SyncBatchNorm left alone in the graph on the CPU.

>>> sync_group([torch.nn.SyncBatchNorm(2)]) is None    # no process group: nothing to synchronise
True
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

# torch 2.14 deprecates torch.distributed.nn.functional.all_reduce in favour of the functional
# collectives, whose all_reduce has no backward; the autograd-aware one is what SyncBatchNorm-like
# statistics need, so its notice is silenced (this message only).
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)

__all__ = ["SYNC_ATTR", "mark_sync_batch_norm", "synchronises", "sync_group", "sync_moments"]

SYNC_ATTR = "repq_sync_bn"  # a BN module with this attribute True synchronises like a SyncBatchNorm


def mark_sync_batch_norm(model: nn.Module) -> int:
    """Mark every BatchNorm in ``model`` to normalize with the global batch's statistics in a process
    group (over the default group); returns how many.

    >>> mark_sync_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.BatchNorm1d(2)))
    2
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            setattr(module, SYNC_ATTR, True)
            count += 1
    return count


def synchronises(bn: nn.Module) -> bool:
    """A ``SyncBatchNorm``, or a BN marked by :func:`mark_sync_batch_norm`.

    >>> synchronises(torch.nn.SyncBatchNorm(2)), synchronises(torch.nn.BatchNorm2d(2))
    (True, False)
    """
    return isinstance(bn, nn.SyncBatchNorm) or bool(getattr(bn, SYNC_ATTR, False))


def sync_group(bns: Sequence[nn.Module]) -> Any:
    """The process group the BNs synchronise over, or None (no SyncBatchNorm among them, eval mode,
    or no process group of more than one process).

    >>> sync_group([torch.nn.BatchNorm2d(2)]) is None
    True
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    for bn in bns:
        if bn.training and synchronises(bn):
            group = getattr(bn, "process_group", None) or dist.group.WORLD
            return group if dist.get_world_size(group) > 1 else None
    return None


def sync_moments(stats: Sequence[tuple[torch.Tensor, torch.Tensor, int]], group: Any
                 ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per-process ``(mean, biased var, count)`` of each BN -> those of the global batch (two
    autograd-aware all-reduces for all of them together, in float64; the statistics come back in float32
    or wider); ``group`` None returns ``stats``.

    >>> sync_moments([(torch.zeros(2), torch.ones(2), 8)], None)[0][2]
    8
    """
    if group is None or not stats:
        return list(stats)
    from torch.distributed.nn.functional import all_reduce

    # counts and sums in float64: a count above 65504 is inf in fp16 (and 2**24 is where float32 stops counting);
    # the statistics come back in float32 at least
    ref = stats[0][0]
    out_dtype = torch.promote_types(ref.dtype, torch.float32)
    counts = torch.tensor([float(c) for _, _, c in stats], dtype=torch.float64, device=ref.device)
    sums = torch.cat([m.reshape(-1).double() * float(c) for m, _, c in stats] + [counts])
    sums = all_reduce(sums, group=group)
    totals = sums[-len(stats):]
    means, offset = [], 0
    for (m, _, _), n in zip(stats, totals.detach()):
        means.append(sums[offset: offset + m.numel()].reshape(m.shape) / n)
        offset += m.numel()
    spread = torch.cat([(v.double() + (m.double() - mean).square()).reshape(-1) * float(c)
                        for (m, v, c), mean in zip(stats, means)])
    spread = all_reduce(spread, group=group)
    out, offset = [], 0
    for (m, _, _), mean, n in zip(stats, means, totals.tolist()):
        var = spread[offset: offset + m.numel()].reshape(m.shape) / n
        out.append((mean.to(out_dtype), var.to(out_dtype), int(round(n))))
        offset += m.numel()
    return out
