"""The BN statistics of a prepared graph: how ``prepare`` calls ``quant.bn_stats`` and rewires the calls.

Each BatchNorm inside a block becomes a ``branch_statistics(x, branch, bn, mode, moments)`` node
(:class:`StatisticsCall` names its arguments; ``branch`` is a ``quant.branch.Branch`` of graph
values) and one ``bn_fold`` of its result. After all blocks are emitted, the BNs that read one block
input share one ``block_statistics`` node (:func:`share_block_statistics`), and the weight
functions read the running statistics through a clone (:func:`snapshot_running_stats`).

>>> import torch.nn as nn, repq_fx
>>> gm = repq_fx.prepare(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
>>> [StatisticsCall.of(n).mode for n in gm.graph.nodes if n.target is branch_statistics]
[<BnMode.BATCH: 'batch'>]
"""
from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch.fx as fx

from ..quant.bn_stats import BnMode, Branch, block_statistics, branch_statistics
from ..quant.branch import LEGACY_ARGS, from_legacy

# the modes in which BNs compute statistics in train mode, and so can share them
_SHARED_MODES = (BnMode.BATCH, BnMode.ESTIMATE)


class StatisticsCall(NamedTuple):
    """The arguments of a ``branch_statistics`` node, by name (``moments``: the block input's moments
    in ``ESTIMATE`` mode, then the BN's share of a ``block_statistics`` node).

    ``prepare`` writes ``branch`` as a :class:`Branch` of nodes and values. A graph re-traced from its
    code (``pickle``/``torch.load`` of a GraphModule) has a node that constructs it instead, as FX's
    tracer does for every NamedTuple argument; the values are the same.
    """

    x: fx.Node
    branch: Branch
    bn: fx.Node
    mode: BnMode
    moments: Any = None

    @classmethod
    def of(cls, node: fx.Node) -> "StatisticsCall":
        """The arguments of ``node`` (a ``branch_statistics`` call; see the module's example)."""
        args = from_legacy(node.args) if len(node.args) == LEGACY_ARGS else node.args  # an older saved graph
        return cls(*args, **node.kwargs)


MOMENTS_ARG = StatisticsCall._fields.index("moments")


def share_block_statistics(gm: fx.GraphModule) -> None:
    """The BNs that read one block input get their train-mode statistics from one ``block_statistics``.

    Each ``branch_statistics`` node stays (eval mode and ``lower`` read the running statistics
    through it) and receives its BN's ``BranchStatistics`` as its ``moments``. A BN joins a
    group when everything it reads is computed before the group's first BN, so the shared node
    can run first: the BNs of parallel branches do, a BN behind another BN of the same block
    (a 1x1 -> BN -> kxk -> BN chain) does not and starts a group of its own.

    >>> import torch.nn as nn, repq_fx
    >>> from repq_fx.quant.bn_stats import block_statistics
    >>> gm = repq_fx.prepare(nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2)))   # one BN: nothing to share
    >>> sum(n.target is block_statistics for n in gm.graph.nodes)
    0
    """
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is branch_statistics and StatisticsCall.of(
                node).mode in _SHARED_MODES:
            by_input.setdefault(StatisticsCall.of(node).x, []).append(node)
    for x, members in by_input.items():
        group: list[fx.Node] = []
        for node in members + [None]:
            if node is not None and group and _joins(node, group[0], position):
                group.append(node)
                continue
            if len(group) > 1:
                _share(gm, x, group)
            group = [node] if node is not None else []


def _joins(node: fx.Node, first: fx.Node, position: dict[fx.Node, int]) -> bool:
    """Whether ``node`` can take its statistics from a shared node placed before ``first``."""
    call = StatisticsCall.of(node)
    reads = [a for a in (*call.branch, call.bn) if isinstance(a, fx.Node)]
    return call.mode == StatisticsCall.of(first).mode and all(position[a] < position[first] for a in reads)


def _share(gm: fx.GraphModule, x: fx.Node, group: list[fx.Node]) -> None:
    """One ``block_statistics`` node before ``group[0]``; each member reads its share as ``moments``."""
    calls = [StatisticsCall.of(m) for m in group]
    paths = [c.bn.target.split(".") if c.bn.op == "get_attr" else [] for c in calls]
    common = [p[0] for p in zip(*paths) if all(q == p[0] for q in p)]
    with gm.graph.inserting_before(group[0]):
        shared = gm.graph.call_function(block_statistics, (x, tuple(c.branch for c in calls),
                                                           tuple(c.bn for c in calls), calls[0].mode))
        shared._rename("_".join(common + ["statistics"]))
        for i, member in enumerate(group):
            item = gm.graph.call_function(operator.getitem, (shared, i))
            if paths[i]:
                item._rename("_".join(paths[i] + ["statistics"]))
            member.update_arg(MOMENTS_ARG, item)


def snapshot_running_stats(gm: fx.GraphModule) -> None:
    """Weight functions read BN running statistics through a clone.

    ``branch_statistics`` updates them in place in train mode, as ``nn.BatchNorm2d`` does;
    a merged weight that read them directly (DBB's BN-valued padding) would have its saved
    tensors invalidated for backward.

    >>> import torch.nn as nn, repq_fx
    >>> gm = repq_fx.prepare(nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2)))   # statistics read only
    >>> [n for n in gm.graph.nodes if n.target == "clone"]
    []
    """
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not node.target.endswith(("running_mean", "running_var")):
            continue
        readers = [u for u in node.users if u.target is not branch_statistics]
        if not readers:
            continue
        with gm.graph.inserting_after(node):
            snapshot = gm.graph.call_method("clone", (node,))
        for user in readers:
            user.replace_input_with(node, snapshot)


__all__ = ["MOMENTS_ARG", "StatisticsCall", "share_block_statistics", "snapshot_running_stats"]
