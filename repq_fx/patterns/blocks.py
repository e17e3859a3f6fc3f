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

from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from ..algebra import AffineConv, ConvParams, NoMatch
from ..capture.tracer import STOCHASTIC_DEPTH
from ..ir import record_of
from .evaluate import (PARTS_REASON, ChannelParts, Failure, entry_channels, evaluate, evaluate_for_every_value,
                       finalized)
from .linear_ops import LinearOp, RuntimeArgument, linear_op, tensor_nodes
from .naming import block_name, conv_path, unique_names
from .regions import Region, partition
from .values import GenericValues, NumericValues, running_stats_bn


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


@dataclass
class Analysis:
    """Everything ``find_blocks`` learned about a graph."""

    blocks: list[Block]
    linear: dict[fx.Node, LinearOp]  # final linear ops (after demotions)
    regions: list[Region]
    notes: dict[fx.Node, str] = field(default_factory=dict)  # node -> where/why the algebra split a region
    joins: dict[fx.Node, str] = field(default_factory=dict)  # sums/concats of two different tensors (residuals)


def find_blocks(gm: fx.GraphModule, values: NumericValues | None = None) -> Analysis:
    """Partition ``gm`` (canonical) into blocks and merge each one numerically.

    A region is merged only where the merge holds for every value of the trainable tensors
    (``evaluate_for_every_value``), so ``merge``, ``prepare`` and ``explain`` see one structure.
    """
    values = values or NumericValues(gm)
    linear, notes = _linear_ops(gm)
    joins: dict[fx.Node, str] = {}
    regions, results = _merge_regions(gm, linear, values, notes, joins)
    _note_stochastic_neighbours(gm, [r for r, result in results.items() if result is not None], notes)
    blocks = [_block(gm, region, result, linear, notes) for region, result in results.items() if result is not None]
    return Analysis(unique_names(blocks, gm), linear, regions, notes, joins)


def _linear_ops(gm: fx.GraphModule) -> tuple[dict[fx.Node, LinearOp], dict[fx.Node, str]]:
    """The linear ops of ``gm``, and why the ops worth a word (their record's refusal) are not."""
    tensors = tensor_nodes(gm)
    linear: dict[fx.Node, LinearOp] = {}
    notes: dict[fx.Node, str] = {}
    for n in gm.graph.nodes:
        if n in tensors and n.op != "placeholder":
            verdict = linear_op(n, tensors)
            if verdict:
                linear[n] = verdict
            elif isinstance(verdict, RuntimeArgument):
                notes[n] = f"left out: {verdict.reason}"
            elif why := _refusal(gm, n, verdict.reason):
                notes[n] = f"left out: {why}"
    return linear, notes


def _refusal(gm: fx.GraphModule, node: fx.Node, verdict: str) -> str:
    """Why a conv-like, BN or pad node that is not a linear op stays out of every block ("" for other ops);
    ``verdict`` is the linear-op rules' own reason."""
    record = record_of(node, gm)
    return "" if record is None else record.refusal(gm, node, verdict)


def _merge_regions(gm: fx.GraphModule, linear: dict[fx.Node, LinearOp], values: NumericValues,
                   notes: dict[fx.Node, str], joins: dict[fx.Node, str]) -> tuple[list[Region], dict]:
    """Partition and evaluate until no region is refused (each refusal splits its region); the regions and
    each one's result (None: no conv in it)."""
    generic = GenericValues(gm, values.dtype)
    forced: set[fx.Node] = set()
    cache: dict[tuple, AffineConv | ChannelParts | Failure] = {}
    while True:
        regions, demoted = partition(gm, linear, forced)
        joins.update(demoted)
        failure = None
        results: dict[Region, AffineConv | ChannelParts | Failure | None] = {}
        for region in regions:
            if not any(linear[n].is_conv for n in region.nodes):
                results[region] = None
                continue
            key = (region.entry, region.exit, region.nodes)
            if key not in cache:
                cache[key] = _evaluate_region(gm, region, linear, values, generic)
            results[region] = cache[key]
            if isinstance(cache[key], Failure) and cache[key].kind != "channels":
                failure = (region, cache[key])
                break
        if failure is None:
            return regions, results
        _split(*failure, linear, forced, notes)


def _evaluate_region(gm: fx.GraphModule, region: Region, linear: dict[fx.Node, LinearOp], values: NumericValues,
                     generic: GenericValues) -> AffineConv | ChannelParts | Failure:
    channels = entry_channels(gm, region, linear, values)
    if channels is None:
        return Failure(region.exit, "channels", "channel count of the block input is unknown; pass example_inputs")
    return evaluate_for_every_value(region, linear, values, generic, channels)


def _block(gm: fx.GraphModule, region: Region, result: AffineConv | ChannelParts | Failure,
           linear: dict[fx.Node, LinearOp], notes: dict[fx.Node, str]) -> Block:
    """The block of an evaluated region: its merged conv (or one per concatenated branch), or why none."""
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
    return Block(block_name(region, gm), region, tuple(linear[n] for n in region.nodes), conv, reason, parts)


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


__all__ = ["Block", "Analysis", "find_blocks", "stochastic_rate", "Failure", "ChannelParts", "NumericValues",
           "GenericValues", "running_stats_bn", "entry_channels", "evaluate", "evaluate_for_every_value", "finalized",
           "unique_names", "conv_path", "block_name", "PARTS_REASON"]
