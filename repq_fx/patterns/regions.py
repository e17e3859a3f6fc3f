"""Partition the linear nodes of a canonical graph into single-entry single-exit regions.

A region is a maximal set of linear nodes computing one tensor (its *exit*) as an
affine function of one other tensor (its *entry*), whose intermediate tensors have
no user outside the region. The partition is a fixpoint:

1. a linear node with a non-linear user (or the graph output) is an exit;
2. a linear node whose inputs trace back to two different entries (``relu(x) + conv(x)``)
   cannot be one affine map of one tensor: it is demoted to a non-linear op and its
   inputs become exits;
3. an intermediate shared by two regions becomes an exit of its own.

Region membership is networkx's ``ancestors`` of the exit in the dataflow between linear
nodes, with the edges out of exits removed: the nodes an exit depends on, down to its entry.

>>> import torch.nn as nn
>>> from repq_fx.capture import capture
>>> from repq_fx.patterns.linear_ops import linear_op, tensor_nodes
>>> gm = capture(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
>>> t = tensor_nodes(gm)
>>> ops = {n: op for n in t if (op := linear_op(n, t))}
>>> [(r.entry.name, r.exit.name, len(r.nodes)) for r in partition(gm, ops, set())[0]]
[('input_1', 'batch_norm', 2)]
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from .linear_ops import LinearOp


@dataclass(frozen=True)
class Region:
    """Linear nodes computing ``exit`` from ``entry`` (``nodes`` in graph order, ``exit`` last)."""

    entry: fx.Node
    exit: fx.Node
    nodes: tuple[fx.Node, ...]


def partition(
    gm: fx.GraphModule, ops: dict[fx.Node, LinearOp], forced_exits: set[fx.Node]
) -> tuple[list[Region], dict[fx.Node, str]]:
    """Regions of the linear nodes in ``ops`` (modified: demoted nodes are removed) and why nodes were demoted."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    demoted: dict[fx.Node, str] = {}
    while True:
        exits = {n for n in ops if n in forced_exits or any(u not in ops for u in n.users)}
        bad = _first_multi_entry(ops, exits, order)
        if bad is not None:
            node, entries = bad
            names = ", ".join(sorted(e.name for e in entries))
            demoted[node] = f"combines tensors with different sources ({names}): not one affine map of one tensor"
            del ops[node]
            continue
        regions, shared = _regions(ops, exits, order)
        if shared:
            forced_exits = forced_exits | shared
            continue
        return regions, demoted


def _entries(node: fx.Node, ops: dict[fx.Node, LinearOp], exits: set[fx.Node], memo: dict) -> set[fx.Node]:
    out: set[fx.Node] = set()
    for i in ops[node].inputs:
        out |= {i} if (i not in ops or i in exits) else memo[i]
    return out


def _first_multi_entry(ops, exits, order) -> tuple[fx.Node, set[fx.Node]] | None:
    memo: dict[fx.Node, set[fx.Node]] = {}
    for node in sorted(ops, key=order.__getitem__):
        memo[node] = _entries(node, ops, exits, memo)
        if len(memo[node]) > 1:
            return node, memo[node]
    return None


def _internal_dataflow(ops: dict[fx.Node, LinearOp], exits: set[fx.Node]) -> nx.DiGraph:
    """Edges ``i -> n`` between linear nodes, except out of exits: a region ends at its exit."""
    g = nx.DiGraph()
    g.add_nodes_from(ops)
    g.add_edges_from((i, n) for n, op in ops.items() for i in op.inputs if i in ops and i not in exits)
    return g


def _regions(ops, exits, order) -> tuple[list[Region], set[fx.Node]]:
    dataflow = _internal_dataflow(ops, exits)
    owner: dict[fx.Node, fx.Node] = {}
    shared: set[fx.Node] = set()
    regions = []
    for exit_ in sorted(exits, key=order.__getitem__):
        inner = nx.ancestors(dataflow, exit_) | {exit_}
        entries = {i for n in inner for i in ops[n].inputs if i not in ops or i in exits}
        if len(entries) != 1:  # _first_multi_entry demoted every node with two
            raise AssertionError(f"region of {exit_.name} has entries {sorted(e.name for e in entries)}")
        for n in inner - {exit_}:
            if owner.setdefault(n, exit_) is not exit_:
                shared.add(n)
        regions.append(Region(entries.pop(), exit_, tuple(sorted(inner, key=order.__getitem__))))
    return regions, shared
