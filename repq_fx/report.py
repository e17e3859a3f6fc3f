"""The report ``explain`` returns: every block, its branches, merged or not, and why.

>>> import torch.nn as nn
>>> from repq_fx import explain
>>> r = explain(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
>>> r.blocks[0].branches, r.blocks[0].merged
('conv3x3 -> bn', True)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx
import torch.nn.functional as F

from .ir import BatchNormView, ConvView, attributes_read, batch_norm, record_of
from .ir.records import target_name
from .patterns.blocks import Analysis, Block
from .patterns.linear_ops import LinearOp


@dataclass(frozen=True)
class BlockReport:
    """One block as ``explain`` shows it."""

    name: str  # module path of the block
    branches: str  # the region as an expression, e.g. "[conv3x3 -> bn + conv1x1 -> bn + bn]"
    num_convs: int  # convs in the block before merging
    merged: bool
    kernel: tuple[int, int] | None  # merged kernel size (of the first conv, when it becomes several)
    reason: str  # why it was not merged, or where it was split from its neighbours
    kernels: tuple[tuple[int, int], ...] = ()  # one per conv the block becomes
    convs: tuple[str, ...] = ()  # module paths of the block's convs (node names where a weight is computed)

    @property
    def outputs(self) -> int:
        """Convs the block becomes when merged (one, or one per concatenated branch)."""
        return max(len(self.kernels), 1)


@dataclass(frozen=True)
class Report:
    """What ``merge``/``prepare`` do to a model. ``str(report)`` is a table."""

    model: str
    blocks: tuple[BlockReport, ...]
    # (conv module path or node, reason) of convs in no block and of linear ops not merged
    left_out: tuple[tuple[str, str], ...] = field(default=())
    joins: int = 0  # sums/concats of tensors from different sources (residual adds): not blocks
    warnings: tuple[str, ...] = field(default=())  # what merge/prepare would refuse (NaN/Inf values, ...)
    lone_bns: int = 0  # BatchNorms in linear regions without a conv: nothing to fold them into
    bns_after_linear: int = 0  # of those, BatchNorms that read a linear layer's output (through reshapes)
    front_end: str = "fx"  # the capture front end that produced the graph: "fx" or "export"
    capture_note: str = ""  # why the export front end was used (FX's reason), if it was a fallback
    outside_blocks: tuple[str, ...] = field(default=())  # the model's convs in no block (in left_out)

    @property
    def merged(self) -> tuple[BlockReport, ...]:
        return tuple(b for b in self.blocks if b.merged)

    @property
    def not_merged(self) -> tuple[BlockReport, ...]:
        return tuple(b for b in self.blocks if not b.merged)

    def __str__(self) -> str:
        rows = [("block", "branches", "convs", "merged", "reason")]
        for b in self.blocks:
            kernel = "-> " + "+".join(f"{k[0]}x{k[1]}" for k in b.kernels) if b.kernels else "no"
            rows.append((b.name or "<root>", b.branches, str(b.num_convs), kernel, b.reason))
        widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((40, 70, 5, 16, 200))]
        each = "into one conv each" if all(b.outputs == 1 for b in self.merged) else "(one conv each, or one per " \
                                                                                      "concatenated branch)"
        lines = [f"{self.model}: {len(self.merged)} of {len(self.blocks)} blocks merged {each}, "
                 f"{sum(b.num_convs for b in self.merged)} convs -> {sum(b.outputs for b in self.merged)}"
                 + (f"; {len(self.outside_blocks)} convs in no block stay as they are, in float (listed below)"
                    if self.outside_blocks else "")]
        for r in rows:
            lines.append("  ".join(_clip(c, w).ljust(w) for c, w in zip(r, widths)).rstrip())
        for reason, nodes in _grouped(self.left_out):
            lines.append(f"  not merged: {', '.join(nodes)}: {reason}")
        if not self.blocks and not self.left_out:
            lines.append("  (no 2-d convolutions: nothing to merge)")
        for warning in self.warnings:
            lines.append(f"  warning: {warning}")
        if self.joins:
            lines.append(f"  ({self.joins} sums/concats join tensors of different sources, e.g. residual adds: "
                         "they stay as they are)")
        if self.bns_after_linear:
            lines.append(f"  ({self.bns_after_linear} BatchNorms read a linear layer's output through a reshape or "
                         "transpose, or directly (BatchNorm1d): not folded (only linear -> permute(0, 3, 1, 2) -> "
                         "BatchNorm2d is, as a 1x1 conv); they stay BatchNorms)")
        if self.lone_bns - self.bns_after_linear:
            lines.append(f"  ({self.lone_bns - self.bns_after_linear} BatchNorms sit between non-linear ops with no "
                         "conv to fold them into, "
                         "e.g. after an activation or a residual add: they stay BatchNorms)")
        if self.front_end != "fx":
            lines.append(f"  (captured with torch.{self.front_end}"
                         + (f"; {self.capture_note}" if self.capture_note else "") + ")")
        return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _grouped(left_out: Sequence[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Entries with the same reason together (the convs inside one module kept whole), in order."""
    groups: dict[str, list[str]] = {}
    for node, reason in left_out:
        groups.setdefault(reason, []).append(node)
    return list(groups.items())


def build_report(model_name: str, gm: fx.GraphModule, analysis: Analysis, warnings: Sequence[str] = (),
                 convs: Sequence[str] = ()) -> Report:
    """The report of one analysis of a canonical graph (``warnings``: what merge/prepare would refuse;
    ``convs``: the module paths of the model's convs, each of which the report accounts for)."""
    blocks = tuple(_block_report(gm, b, analysis.linear, set(convs)) for b in analysis.blocks)
    in_blocks = {n for b in analysis.blocks for n in (b.region.entry, *b.region.nodes)}
    given = " ".join(b.reason for b in blocks)  # notes a block already shows as its reason
    left_out = [(_node_name(gm, n), r) for n, r in analysis.notes.items() if n not in in_blocks and r not in given]
    accounted = {c for b in blocks for c in b.convs} | {name for name, _ in left_out}
    outside = [c for c in convs if c not in {c for b in blocks for c in b.convs}]
    left_out += [(c, _why_outside(gm, c)) for c in outside if c not in accounted]
    in_block_regions = {b.region for b in analysis.blocks}
    lone = [n for r in analysis.regions if r not in in_block_regions for n in r.nodes if n.target is batch_norm]
    after_linear = sum(_reads_a_linear(BatchNormView.of(n).x) for n in lone)
    return Report(model_name, blocks, tuple(left_out), len(analysis.joins), tuple(warnings), lone_bns=len(lone),
                  bns_after_linear=after_linear, outside_blocks=tuple(outside))


_RESHAPES = frozenset({"permute", "transpose", "flatten", "reshape", "view", "contiguous", "movedim", "squeeze",
                       "unsqueeze"})


def _reads_a_linear(node: fx.Node, depth: int = 4) -> bool:
    """``node`` is a linear layer's output, or one moved by reshapes/transposes."""
    if node.op == "call_function" and node.target is F.linear:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if depth == 0 or node.op not in ("call_method", "call_function") or name not in _RESHAPES or not node.args:
        return False
    return isinstance(node.args[0], fx.Node) and _reads_a_linear(node.args[0], depth - 1)


def _node_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node as the report names it: a conv by its module path, a module call by the module."""
    if node.op == "call_module":
        return node.target
    record = record_of(node)
    if record is not None and record.conv and len(node.args) > 1:
        return ConvView.of(node).weight_owner(gm) or node.name
    return node.name


def _why_outside(gm: fx.GraphModule, conv: str) -> str:
    """Why a conv module of the model is in no block (the graph has no note on it)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and conv.startswith(node.target + "."):
            module = gm.get_submodule(node.target)
            why = gm.meta.get("repq_leaf_reasons", {}).get(node.target, "it is called as one module, not traced into")
            return (f"inside {type(module).__name__} {node.target!r}, kept as one module: {why}; "
                    "not merged or quantized, it stays float")
    if any(n.op == "get_attr" and n.target.startswith(conv + ".") for n in gm.graph.nodes):
        return "its weight is read, but not by a conv of a block: left as it is"
    return "not called by forward() (no op of the captured graph uses it)"


def _conv_modules(gm: fx.GraphModule, conv: ConvView, known: set[str]) -> list[str]:
    """The conv modules whose parameters a (possibly computed) conv weight is made of, e.g. the
    module of a weight standardized in forward (timm's ScaledStdConv2d). ``known``: the model's conv
    module paths (a GraphModule keeps only the parameters its graph reads, not their modules)."""
    owner, weight = conv.weight_owner(gm), conv.weight
    if owner or not isinstance(weight, fx.Node):
        return [owner] if owner else []
    paths = (a.target.rpartition(".")[0] for a in attributes_read([weight]))
    found = list(dict.fromkeys(p for p in paths if p in known))
    return found


def _block_report(gm: fx.GraphModule, block: Block, linear: dict[fx.Node, LinearOp],
                  known: set[str]) -> BlockReport:
    merged = block.parts or ((block.conv,) if block.conv is not None else ())
    kernels = tuple(tuple(int(s) for s in c.weight.shape[2:]) for c in merged)
    convs = tuple(dict.fromkeys(c for op in block.ops if op.is_conv
                                for c in (_conv_modules(gm, ConvView.of(op.node), known) or [op.node.name])))
    return BlockReport(block.name, describe(gm, block.region.exit, block.region.entry, linear),
                       block.num_convs, block.merged, kernels[0] if kernels else None, block.reason, kernels,
                       convs)


def describe(gm: fx.GraphModule, node: fx.Node, entry: fx.Node, linear: dict[fx.Node, LinearOp]) -> str:
    """The region ending at ``node`` as a short expression of op names."""
    if node is entry or node not in linear:
        return "x"
    op = linear[node]
    if op.kind == "unary":
        inner = describe(gm, op.inputs[0], entry, linear)
        name = label(gm, node)
        return name if inner == "x" else f"{inner} -> {name}"
    if op.kind == "cat":
        return "cat[" + ", ".join(describe(gm, i, entry, linear) for i in op.inputs) + "]"
    text = ""
    for sign, term in _sum_terms(gm, node, entry, linear, 1.0):
        term = f"({term})" if " + " in term or " - " in term else term
        text += (" - " if sign < 0 else " + ") + term if text else ("-" + term if sign < 0 else term)
    return "[" + text + "]"


def _sum_terms(gm, node, entry, linear, sign: float) -> list[tuple[float, str]]:
    """The terms of a (nested) sum, flattened: a + (b + c) -> [a, b, c]."""
    op = linear.get(node)
    if node is entry or op is None or op.kind != "sum":
        return [(sign, describe(gm, node, entry, linear))]
    terms = []
    for s, i in zip(op.signs, op.inputs):
        terms += _sum_terms(gm, i, entry, linear, sign * s)
    return terms


def label(gm: fx.GraphModule, node: fx.Node) -> str:
    """The op as a block's branches name it: ``conv3x3/s2/g4``, ``bn``, ``avgpool3``, ``pad``, ``crop``, ``scale``,
    ``shift`` (its record's label, :mod:`repq_fx.ir.records`); an op with no record by its function's name."""
    record = record_of(node, gm)
    return record.label(gm, node) if record is not None else target_name(gm, node)
