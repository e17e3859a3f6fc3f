"""The affine map of one region, evaluated with the algebra: the step shared by ``find_blocks`` (numbers)
and ``prepare`` (symbolic values that emit FX nodes).

>>> import torch.nn as nn
>>> from repq_fx.capture import capture
>>> from repq_fx.patterns.blocks import find_blocks
>>> gm = capture(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)))
>>> analysis = find_blocks(gm)
>>> region = analysis.blocks[0].region
>>> evaluate(region, analysis.linear, NumericValues(gm), 3).weight.shape
torch.Size([8, 3, 3, 3])
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from ..algebra import AffineConv, ConvParams, NoMatch, add, compose, concat, ops, to_conv
from ..algebra.compose import composite_shape
from ..algebra.decisions import about, disagreement, recording
from ..ir import ConvView, record_of
from .linear_ops import LinearOp, Values
from .regions import Region
from .values import NumericValues


@dataclass(frozen=True)
class Failure:
    """Where and why the algebra refused a region."""

    node: fx.Node
    kind: str  # "op" | "compose" | "combine" | "final" | "cost" | "channels" | "values"
    reason: str


@dataclass(frozen=True)
class ChannelParts:
    """The map of a region as a channel concat of maps of its entry, one per concatenated branch."""

    maps: tuple[AffineConv, ...]

    @property
    def out_channels(self) -> int:
        return sum(m.out_channels for m in self.maps)


def entry_channels(gm: fx.GraphModule, region: Region, linear: dict[fx.Node, LinearOp], values: Values) -> int | None:
    """Channel count of a region's entry: from shape metadata, or from the first op that fixes it."""
    meta = region.entry.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape") and len(meta.shape) >= 2:
        return int(meta.shape[1])
    frontier = [region.entry]
    seen = set()
    inside = set(region.nodes)
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user not in inside or user in seen:
                continue
            seen.add(user)
            c = _input_channels(user, values)
            if c is not None:
                return c
            if linear[user].kind in ("unary", "sum"):  # channel-preserving: pad, pool, crop, scalar ops, sums
                frontier.append(user)
    return None


def _input_channels(node: fx.Node, values: Values) -> int | None:
    """The input channels ``node``'s parameters fix (its record's channel rule), or None."""
    record = record_of(node)
    return None if record is None else record.in_channels(node, values.param)


def evaluate(region: Region, linear: dict[fx.Node, LinearOp], values: Values,
             channels: int) -> AffineConv | ChannelParts | Failure:
    """The affine map from ``region.entry`` to ``region.exit``, or where the algebra refused.

    Where one merged conv would cost more than the convs it replaces and the exit is a channel
    concat followed by per-channel ops (a BatchNorm), the map is returned as ``ChannelParts``: each
    concatenated branch with its channels of those ops.
    """
    maps: dict[fx.Node, AffineConv | None] = {region.entry: None}  # None: the identity
    parts: dict[fx.Node, list[AffineConv]] = {}  # channel concats (and per-channel ops after them), by branch

    def full(n: fx.Node) -> AffineConv:
        m = maps[n]
        return ops.identity(channels, values.dtype) if m is None else m

    cost = 0.0  # multiply-adds per entry pixel of the convs in the region
    costlier: fx.Node | None = None  # first conv whose composition cost more than the two convs apart
    budget = sum(float(values.param(ConvView.of(linear[n].node).weight).numel()) for n in region.nodes
                 if linear[n].is_conv)
    for node in region.nodes:
        with about(node):
            step = _step(node, linear, values, maps, full, channels, budget)
        if isinstance(step, Failure):
            return step
        result, own, own_cost, grew = step
        cost += own_cost
        if costlier is None and grew:
            costlier = node
        maps[node] = result
        with about(node):
            _track_parts(node, linear[node], own, full, parts)
    final = full(region.exit)
    if final.reads_padding() and final.pad_value is not None:
        first = next(n for n in region.nodes if maps[n] is not None and maps[n].pad_value is not None)
        return Failure(first, "final", "the input is padded with a non-zero value: no single conv computes "
                                       "this at the borders")
    merged_cost = _macs(final.weight, final.stride)
    if merged_cost > cost * (1 + 1e-9):
        if linear[region.exit].kind == "unary" and region.exit in parts:
            split = ChannelParts(tuple(parts[region.exit]))
            if sum(_macs(m.weight, m.stride) for m in split.maps) <= cost * (1 + 1e-9) and not any(
                    m.reads_padding() and m.pad_value is not None for m in split.maps):
                return split
        # split where a sequence first grew in cost; else the exit's sum/concat is what costs
        return Failure(costlier or region.exit, "cost", f"one merged conv would cost more than its parts "
                                                        f"({merged_cost:.0f} vs {cost:.0f} multiply-adds per pixel)")
    return final


def _track_parts(node: fx.Node, op: LinearOp, own: AffineConv | None, full: Callable,
                 parts: dict[fx.Node, list[AffineConv]]) -> None:
    """Keep a channel concat's branches apart, through the per-channel ops that follow it (R8 by rows).

    ``own`` is the node's own map (a unary op), as ``_step`` built it.
    """
    if op.kind == "cat":
        parts[node] = [full(i) for i in op.inputs]
        return
    if op.kind != "unary" or op.inputs[0] not in parts or own is None or not own.is_diagonal():
        return
    out, start = [], 0
    for branch in parts[op.inputs[0]]:
        stop = start + branch.out_channels
        rows = own.with_(weight=own.weight[start:stop], bias=None if own.bias is None else own.bias[start:stop],
                         groups=stop - start)
        composed = compose(rows, branch)
        if isinstance(composed, NoMatch):
            return
        out.append(composed)
        start = stop
    parts[node] = out


def _step(node: fx.Node, linear: dict[fx.Node, LinearOp], values: Values, maps: dict, full: Callable,
          channels: int, budget: float) -> tuple[AffineConv, AffineConv | None, float, bool] | Failure:
    """The map of ``node`` from the region's entry, its own map (unary ops), its own conv cost, and
    whether composing grew the cost."""
    op = linear[node]
    own, own_cost, grew = None, 0.0, False
    if op.kind == "unary":
        before = maps[op.inputs[0]]
        own = op.build(values, channels if before is None else before.out_channels, before)
        if isinstance(own, NoMatch):
            return Failure(node, "op", own.reason)
        if before is not None and op.is_conv and _shape_macs(composite_shape(own, before), own, before) > budget:
            return Failure(node, "cost", "one merged conv would cost more than all convs of the block "
                                         "(e.g. depthwise kxk -> pointwise 1x1 becomes a dense kxk)")
        result = own if before is None else compose(own, before)
        if isinstance(result, NoMatch):
            return Failure(node, "compose", result.reason)
        if op.is_conv:
            own_cost = _macs(own.weight, result.stride)
            # e.g. depthwise kxk -> pointwise 1x1 becomes a dense kxk
            grew = before is not None and _macs(result.weight, result.stride) > (
                _macs(before.weight, before.stride) + own_cost) * (1 + 1e-9)
    elif op.kind == "sum":
        result = add([full(i) for i in op.inputs], list(op.signs))
        if isinstance(result, NoMatch):
            return Failure(node, "combine", result.reason)
    else:
        result = concat([full(i) for i in op.inputs])
        if isinstance(result, NoMatch):
            return Failure(node, "combine", result.reason)
    return result, own, own_cost, grew


def _shape_macs(shape: tuple[int, ...], second: AffineConv, first: AffineConv) -> float:
    stride = (first.stride[0] * second.stride[0], first.stride[1] * second.stride[1])
    return float(shape[0] * shape[1] * shape[2] * shape[3]) / (stride[0] * stride[1])


def _macs(weight: Any, stride: tuple[int, int]) -> float:
    """Multiply-adds per input pixel of a conv with ``weight`` at cumulative ``stride``."""
    return float(weight.numel()) / (stride[0] * stride[1])


def evaluate_for_every_value(region: Region, linear: dict[fx.Node, LinearOp], values: NumericValues,
                             generic: NumericValues, channels: int) -> AffineConv | ChannelParts | Failure:
    """``evaluate`` on the model's values, refused where its answer would change once training moves them.

    The region is evaluated on ``values``; if the algebra took a decision from values there
    (``algebra.decisions``), it is evaluated again on ``generic`` (random values of every trainable
    tensor) and the first answer that differs, or that holds for the current values only, becomes
    the failure: the region is split there, as for any other refusal.

    >>> import torch.nn as nn
    >>> from repq_fx.capture import capture
    >>> from repq_fx.patterns.blocks import find_blocks
    >>> gm = capture(nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)))
    >>> analysis = find_blocks(gm)  # the BN's shift is 0 at initialisation, but not after training
    >>> [b.num_convs for b in analysis.blocks], analysis.blocks[0].reason.split(":")[0]
    ([1, 1], 'split here')
    """
    with recording() as taken:
        result = evaluate(region, linear, values, channels)
        finalized(result)
    if not taken:
        return result
    with recording() as other:
        generic_result = evaluate(region, linear, generic, channels)
        finalized(generic_result)
    differs = disagreement(taken, other)
    if differs is not None:
        node = differs.subject if differs.subject in region.nodes else region.exit
        example = "a bias or mean that is exactly 0 now" if differs.kind == "equal" else "a scale could reach 0"
        return Failure(node, "values", f"{differs.question}: true for the current values only ({example}), not for "
                                       "every value training can reach")
    if isinstance(generic_result, Failure) and not isinstance(result, Failure):
        return dataclasses.replace(generic_result, reason=f"{generic_result.reason} (exact for the current values "
                                                          "only, not once training changes them)")
    return result


PARTS_REASON = ("one conv per concatenated branch, each with its channels of the BatchNorm after the concat "
                "(one merged conv would cost more than the branches)")


def finalized(result: AffineConv | ChannelParts | Failure) -> ConvParams | tuple[ConvParams, ...] | NoMatch | None:
    """The ``nn.Conv2d`` parameters of an evaluated region (one per part), or why there are none.

    >>> finalized(ops.conv(torch.ones(2, 2, 3, 3), None, stride=1, padding=1, dilation=1, groups=1)).padding
    (1, 1)
    """
    if isinstance(result, AffineConv):
        return to_conv(result)
    if not isinstance(result, ChannelParts):
        return None
    convs = tuple(to_conv(m) for m in result.maps)
    return next((c for c in convs if isinstance(c, NoMatch)), convs)
