"""Blocks: regions that contain a conv, with their merged map or the reason they cannot be merged.

:func:`find_blocks` partitions the graph (``regions.partition``), evaluates each
region's affine map with the algebra, and where the algebra refuses, splits the
region at the failing op (or leaves the op out) and tries again, so every exact
sub-block is still merged. The evaluation itself (:func:`evaluate`) is shared with
``prepare``, which runs it on symbolic values.

>>> import torch.nn as nn
>>> from repq_fx.capture import capture
>>> gm = capture(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
>>> [(b.name, b.num_convs, b.merged) for b in find_blocks(gm).blocks]
[('', 1, True)]
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..algebra import AffineConv, ConvParams, NoMatch, add, compose, concat, ops, to_conv
from ..algebra.compose import composite_shape
from ..algebra.decisions import about, disagreement, recording
from ..capture.canonicalize import conv_module_refusal, module_refusal
from ..capture.graph_utils import fetch_attr
from ..capture.norm import batch_norm, is_batch_norm
from ..capture.tracer import STOCHASTIC_DEPTH
from .linear_ops import LinearOp, RuntimeArgument, Values, linear_op, tensor_nodes
from .regions import Region, partition


@dataclass(frozen=True)
class Failure:
    """Where and why the algebra refused a region."""

    node: fx.Node
    kind: str  # "op" | "compose" | "combine" | "final" | "cost" | "channels" | "values"
    reason: str


@dataclass(frozen=True)
class Block:
    """A region with at least one conv: ``exit = conv(entry)`` after merging.

    Or ``exit = cat([conv_1(entry), conv_2(entry), ...])`` (``parts``): a channel concat of branches
    followed by a BatchNorm (or other per-channel ops) where one merged conv would cost more than
    the branches; each branch keeps its own conv, with its channels of the BatchNorm folded in.
    """

    name: str  # module path the block lives under ("" for the root)
    region: Region
    ops: tuple[LinearOp, ...]  # the region's ops in graph order
    conv: ConvParams | None  # the merged conv (numeric, eval-mode statistics)
    reason: str = ""  # why it was split or left alone; "" when merged without refusals
    parts: tuple[ConvParams, ...] = ()  # one conv per concatenated branch, in channel order (conv is None)
    scope: str | None = None  # module path new modules go under, when ``name`` was made unique (else ``name``)

    @property
    def module_scope(self) -> str:
        """Where merge/prepare put the block's new modules: the module it lives under. Not ``name``
        once that names a conv (a new module inside the conv would keep the conv alive) or has ``@k``."""
        return self.name if self.scope is None else self.scope

    @property
    def merged(self) -> bool:
        return self.conv is not None or bool(self.parts)

    @property
    def outputs(self) -> int:
        """Convs the block becomes (one, or one per concatenated branch)."""
        return len(self.parts) or 1

    @property
    def num_convs(self) -> int:
        return sum(op.is_conv for op in self.ops)


@dataclass(frozen=True)
class ChannelParts:
    """The map of a region as a channel concat of maps of its entry, one per concatenated branch."""

    maps: tuple[AffineConv, ...]

    @property
    def out_channels(self) -> int:
        return sum(m.out_channels for m in self.maps)


@dataclass
class Analysis:
    """Everything ``find_blocks`` learned about a graph."""

    blocks: list[Block]
    linear: dict[fx.Node, LinearOp]  # final linear ops (after demotions)
    regions: list[Region]
    notes: dict[fx.Node, str] = field(default_factory=dict)  # node -> where/why the algebra split a region
    joins: dict[fx.Node, str] = field(default_factory=dict)  # sums/concats of two different tensors (residuals)


class NumericValues:
    """Parameter values as float64 tensors, BatchNorm with running statistics (the eval-mode merge)."""

    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype = torch.float64) -> None:
        self.gm, self.dtype = gm, dtype
        self._cache: dict[fx.Node, Any] = {}  # values in self.dtype
        self._raw_cache: dict[fx.Node, Any] = {}  # values as the model computes them

    def param(self, arg: Any) -> Any:
        return fx.node.map_arg(arg, self._node_value) if isinstance(arg, (fx.Node, list, tuple, dict)) else arg

    def _node_value(self, node: fx.Node) -> Any:
        if node not in self._cache:
            value = self._raw(node)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.detach().to(self.dtype)
            self._cache[node] = value
        return self._cache[node]

    def leaf(self, value: Any) -> Any:
        """The value used for a parameter, buffer or module read from the model (itself here)."""
        return value

    def _raw(self, node: fx.Node) -> Any:
        """A parameter expression evaluated in the model's own dtype (as the model computes it)."""
        if node.op == "get_attr":
            return self.leaf(fetch_attr(self.gm, node.target))
        if node not in self._raw_cache:
            args = fx.node.map_arg(node.args, self._raw)
            kwargs = fx.node.map_arg(node.kwargs, self._raw)
            with torch.no_grad():
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "call_module":
                    value = self.gm.get_submodule(node.target)(*args, **kwargs)
                else:
                    raise AssertionError(f"cannot evaluate {node.op} {node.target} as a parameter")
            self._raw_cache[node] = value
        return self._raw_cache[node]

    def bn(self, node: fx.Node, module: torch.nn.Module, before: AffineConv | None) -> AffineConv | NoMatch:
        return running_stats_bn(module, self.dtype, self.leaf)


class GenericValues(NumericValues):
    """The same parameter expressions on random values of every trainable tensor.

    Trainable: parameters that require grad, and BatchNorm running statistics (train mode moves
    them). Buffers that never change (fixed masks, identity kernels) and frozen parameters keep
    their values. A decision the algebra takes on these values and on the model's own
    (``algebra.decisions``) holds for the values training will reach, not only for today's
    (a bias that is exactly zero at initialisation). Values are drawn in ``[0.5, 1.5)``, so square
    roots and variances stay defined; the draw is fixed by ``seed``.

    >>> from repq_fx.capture import capture
    >>> gm = capture(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)))
    >>> bool((GenericValues(gm).leaf(gm.get_submodule("1").running_mean) > 0).all())  # zeros in the model
    True
    """

    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__(gm, dtype)
        self._trainable = {id(p) for p in gm.parameters() if p.requires_grad}
        for m in gm.modules():
            if is_batch_norm(m) and m.running_mean is not None:
                self._trainable |= {id(m.running_mean), id(m.running_var)}
        self._generator = torch.Generator().manual_seed(seed)
        self._drawn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor kept alive, its draw)

    def leaf(self, value: Any) -> Any:
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and id(value) in self._trainable):
            return value
        if id(value) not in self._drawn:
            draw = 0.5 + torch.rand(value.shape, generator=self._generator, dtype=torch.float64)
            self._drawn[id(value)] = (value, draw.to(value.dtype))
        return self._drawn[id(value)][1]


def running_stats_bn(module: torch.nn.Module, dtype: torch.dtype, leaf: Callable[[Any], Any] = lambda t: t
                     ) -> AffineConv | NoMatch:
    """The eval-mode map of a BatchNorm module (running statistics), or why there is none.

    ``leaf`` gives the value used for each of the module's tensors (the tensor itself by default).
    """
    if module.running_mean is None or not module.track_running_stats:
        return NoMatch("BatchNorm with track_running_stats=False normalizes with batch statistics even in eval mode")
    weight = leaf(module.weight).detach().to(dtype) if module.weight is not None else None
    bias = leaf(module.bias).detach().to(dtype) if module.bias is not None else None
    return ops.batch_norm(leaf(module.running_mean).to(dtype), leaf(module.running_var).to(dtype), weight, bias,
                          module.eps)


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
            if linear[user].kind == "unary":  # channel-preserving: pad, pool, crop, scalar ops
                frontier.append(user)
            elif linear[user].kind == "sum":
                frontier.append(user)
    return None


def _input_channels(node: fx.Node, values: Values) -> int | None:
    if node.target is torch.nn.functional.conv2d:
        w = values.param(node.args[1])
        return int(w.shape[1]) * int(node.args[6])
    if node.target is batch_norm:
        return int(values.param(node.args[1]).num_features)
    return None


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
    budget = sum(float(values.param(linear[n].node.args[1]).numel()) for n in region.nodes if linear[n].is_conv)
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

    >>> from repq_fx.capture import capture
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


def find_blocks(gm: fx.GraphModule, values: NumericValues | None = None) -> Analysis:
    """Partition ``gm`` (canonical) into blocks and merge each one numerically.

    A region is merged only where the merge holds for every value of the trainable tensors
    (``evaluate_for_every_value``), so ``merge``, ``prepare`` and ``explain`` see one structure.
    """
    values = values or NumericValues(gm)
    generic = GenericValues(gm, values.dtype)
    tensors = tensor_nodes(gm)
    linear: dict[fx.Node, LinearOp] = {}
    notes: dict[fx.Node, str] = {}
    joins: dict[fx.Node, str] = {}
    for n in gm.graph.nodes:
        if n in tensors and n.op != "placeholder":
            verdict = linear_op(n, tensors)
            if verdict:
                linear[n] = verdict
            elif isinstance(verdict, RuntimeArgument):
                notes[n] = f"left out: {verdict.reason}"
            elif why := unmerged_reason(gm, n, verdict.reason):
                notes[n] = f"left out: {why}"
    forced: set[fx.Node] = set()
    cache: dict[tuple, AffineConv | Failure] = {}
    while True:
        regions, demoted = partition(gm, linear, forced)
        joins.update(demoted)
        failure = None
        results: dict[Region, AffineConv | Failure | None] = {}
        for region in regions:
            if not any(linear[n].is_conv for n in region.nodes):
                results[region] = None
                continue
            key = (region.entry, region.exit, region.nodes)
            if key not in cache:
                channels = entry_channels(gm, region, linear, values)
                if channels is None:
                    cache[key] = Failure(region.exit, "channels", "channel count of the block input is unknown; "
                                                                  "pass example_inputs")
                else:
                    cache[key] = evaluate_for_every_value(region, linear, values, generic, channels)
            results[region] = cache[key]
            if isinstance(cache[key], Failure) and cache[key].kind != "channels":
                failure = (region, cache[key])
                break
        if failure is None:
            break
        _split(*failure, linear, forced, notes)
    _note_stochastic_neighbours(gm, [r for r, result in results.items() if result is not None], notes)
    blocks = []
    for region, result in results.items():
        if result is None:
            continue
        region_ops = tuple(linear[n] for n in region.nodes)
        conv, parts = None, ()
        reason = _region_notes(region, notes)
        if isinstance(result, Failure):
            reason = result.reason
        else:
            final = finalized(result)
            if isinstance(final, NoMatch):
                reason = final.reason
            elif isinstance(final, ConvParams):
                conv = final
            else:
                parts = final
                reason = "; ".join(filter(None, [PARTS_REASON, reason]))
        blocks.append(Block(block_name(region, gm), region, region_ops, conv, reason, parts))
    return Analysis(unique_names(blocks, gm), linear, regions, notes, joins)


_CONV_ND_FUNCTIONS = (F.conv1d, F.conv3d)
_CONV_TRANSPOSE_FUNCTIONS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def unmerged_reason(gm: fx.GraphModule, node: fx.Node, verdict: str) -> str:
    """Why a conv-like, BN or pad node that is not a linear op stays out of every block ("" for other ops).

    ``verdict`` is the linear-op rules' own reason.
    """
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.modules.conv._ConvNd):
            return conv_module_refusal(module) or verdict
        if is_batch_norm(module):
            return module_refusal(module) or verdict
        return ""
    if node.op != "call_function":
        return ""
    if node.target in _CONV_ND_FUNCTIONS:
        return f"{node.target.__name__}: only 2-d convolutions are merged and quantized; left as it is, in float"
    if node.target in _CONV_TRANSPOSE_FUNCTIONS:
        return f"{node.target.__name__}: a transposed convolution is not merged (only conv2d); left as it is"
    if node.target in (F.conv2d, F.pad):
        return verdict
    return ""


def stochastic_rate(module: nn.Module) -> float:
    """The drop rate of a dropout / DropPath / StochasticDepth module (0 for anything else)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return float(module.p)
    if type(module).__name__ in STOCHASTIC_DEPTH:
        return float(getattr(module, "drop_prob", getattr(module, "p", 0.0)) or 0.0)
    return 0.0


def _note_stochastic_neighbours(gm: fx.GraphModule, regions: list[Region], notes: dict[fx.Node, str]) -> None:
    """Say why a block ends at (or starts after) a random op: it is kept outside blocks.

    Only random ops next to a block are noted (a dropout in a classifier head explains nothing).
    """
    ends = {r.exit for r in regions}
    starts = {r.entry for r in regions}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node in notes:
            continue
        rate = stochastic_rate(gm.get_submodule(node.target))
        if rate and (node in starts or any(i in ends for i in node.all_input_nodes)):
            name = type(gm.get_submodule(node.target)).__name__
            notes[node] = (f"{name}(p={rate:g}) is random in train mode: kept outside blocks, so the branches "
                           "on either side of it are merged separately")


def _split(region: Region, f: Failure, linear: dict, forced: set, notes: dict) -> None:
    """Cut a refused region: make the failing op's input an exit of its own, or leave the op out."""
    op = linear[f.node]
    cut = None
    if f.kind in ("compose", "cost", "values") and op.kind == "unary" and op.inputs[0] is not region.entry:
        cut = op.inputs[0]  # second(first(x)) not exact, not cheaper or not for every value: materialize first(x)
    elif f.kind == "final" and f.node is not region.exit:
        cut = f.node  # the op that introduced a non-zero pad value ends its own region
    if cut is not None:
        forced.add(cut)
        notes[cut] = f"split here: {f.reason}"
    else:
        notes[f.node] = f"left out: {f.reason}"
        del linear[f.node]


def _region_notes(region: Region, notes: dict[fx.Node, str]) -> str:
    """Notes on the nodes next to this region (where it was split from its neighbours)."""
    found = [notes[n] for n in (region.entry, *region.nodes) if n in notes]
    found += [notes[u] for u in region.exit.users if u in notes]
    return "; ".join(dict.fromkeys(found))


def unique_names(blocks: list[Block], gm: fx.GraphModule) -> list[Block]:
    """Blocks that share a name (the convs of one module, e.g. a Fire module's squeeze and expand
    convs, all named after it) are named after their first conv's module path instead; a name that
    is still shared (one conv module called twice) gets ``@2``, ``@3``... in graph order.

    >>> import torch.nn as nn
    >>> from repq_fx.capture import capture
    >>> class Two(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
    ...     def forward(self, x):
    ...         return self.b(self.a(x).relu()).relu()
    >>> [b.name for b in find_blocks(capture(Two())).blocks]
    ['a', 'b']
    """
    counts = Counter(b.name for b in blocks)
    names = [conv_path(gm, b) or b.name if counts[b.name] > 1 else b.name for b in blocks]
    counts, seen = Counter(names), Counter()
    renamed = []
    for block, name in zip(blocks, names):
        seen[name] += 1
        if counts[name] > 1 and seen[name] > 1:
            name = f"{name}@{seen[name]}"
        renamed.append(block if name == block.name else dataclasses.replace(block, name=name, scope=block.name))
    return renamed


def conv_path(gm: fx.GraphModule, block: Block) -> str:
    """The module path of the block's first conv weight ("" if the weight is computed)."""
    for op in block.ops:
        if op.is_conv:
            w = op.node.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(fetch_attr(gm, w.target), torch.Tensor):
                return w.target.rpartition(".")[0]
    return ""


def block_name(region: Region, gm: fx.GraphModule) -> str:
    """The longest module path shared by the block's parameters (``stages.0.0`` for a timm RepVggBlock)."""
    paths = []
    for n in region.nodes:
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                obj = fetch_attr(gm, a.target)
                paths.append(a.target if isinstance(obj, torch.nn.Module) else a.target.rpartition(".")[0])
        if n.op == "call_module":
            paths.append(n.target)
    if not paths:
        return region.exit.name
    common = ".".join(os.path.commonprefix([p.split(".") for p in paths]))
    if common in paths:  # all ops belong to one module (a conv with a residual): name the block by its parent
        common = common.rpartition(".")[0]
    return common
