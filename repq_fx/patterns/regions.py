"""Partition the linear nodes of a canonical graph into single-entry single-exit regions.

A region is a maximal set of linear nodes computing one tensor (its *exit*) as an
affine function of one other tensor (its *entry*), whose intermediate tensors have
no user outside the region. The partition is a fixpoint:

1. a linear node with a non-linear user (or the graph output) is an exit;
2. a linear node whose inputs trace back to two different entries (``relu(x) + conv(x)``)
   cannot be one affine map of one tensor: it is demoted to a non-linear op and its
   inputs become exits;
3. an intermediate shared by two regions becomes an exit of its own.

The graph is walked as a networkx DiGraph of tensor dataflow, so region membership
is "ancestors of the exit, down to the entry".

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
        dataflow = _dataflow(ops)
        regions, shared = _regions(ops, exits, dataflow, order)
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


def _dataflow(ops: dict[fx.Node, LinearOp]) -> nx.DiGraph:
    g = nx.DiGraph()
    for node, op in ops.items():
        g.add_node(node)
        for i in op.inputs:
            g.add_edge(i, node)
    return g


def _regions(ops, exits, dataflow: nx.DiGraph, order) -> tuple[list[Region], set[fx.Node]]:
    owner: dict[fx.Node, fx.Node] = {}
    shared: set[fx.Node] = set()
    regions = []
    for exit_ in sorted(exits, key=order.__getitem__):
        inner = {exit_}
        stack = [exit_]
        entry = None
        while stack:
            n = stack.pop()
            for i in ops[n].inputs:
                if i not in ops or i in exits:
                    entry = i
                elif i not in inner:
                    inner.add(i)
                    stack.append(i)
        for n in inner - {exit_}:
            if owner.setdefault(n, exit_) is not exit_:
                shared.add(n)
        nodes = tuple(sorted(inner, key=order.__getitem__))
        if entry is None:
            raise AssertionError(f"region of {exit_.name} has no entry")
        regions.append(Region(entry, exit_, nodes))
    if not nx.is_directed_acyclic_graph(dataflow):
        raise AssertionError("tensor dataflow of a traced graph must be acyclic")
    return regions, shared
