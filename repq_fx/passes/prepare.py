"""The prepare pass: each block becomes ``conv2d(Q_a(x), Q_w(M(theta)), b(theta))`` (RepQ).

``M(theta)`` is the block's merged weight, emitted as FX nodes on the block's own
parameters by running the algebra on :class:`~repq_fx.passes.emit.Sym` values. BN
statistics inside the block come from ``quant.bn_stats.branch_statistics`` (batch,
estimated or running, following ``.train()``/``.eval()`` at run time; see ``bn_graph``).
Linears are quantized the same way; ``quantizers`` says where the fake quantizers go.

>>> import torch.nn as nn
>>> from repq_fx.capture import capture
>>> from repq_fx.config import QConfig
>>> gm = prepare_graph(capture(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())), QConfig())
>>> sorted(n for n, _ in gm.named_modules() if n.endswith("fake_quant"))
['input_fake_quant', 'output_fake_quant', 'weight_fake_quant']
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..algebra import AffineConv, NoMatch, kernels, ops
from ..config import BnMode, QConfig
from ..errors import ConfigError
from ..ir import BatchNormView, fetch_attr, param_dtype
from ..patterns.blocks import Analysis, Block, NumericValues, entry_channels, evaluate, finalized, find_blocks
from ..quant.bn_stats import Branch, bn_fold, branch_statistics, input_moments
from ..quant.embed_add import embed_add
from ..quant.fake_quant import ActFakeQuant, WeightFakeQuant
from .bn_graph import share_block_statistics, snapshot_running_stats
from .emit import Emitter, Sym, node_of
from .float32_weights import keep_weights_float32
from .quantizers import add_weight_quantizer, insert_act_quantizers, insert_weight_quantizers_for_linears

# the algebra's functions that a prepared graph runs in a form made for training (same values)
_RECORDED_AS = {kernels.embed_add: embed_add}


class SymValues:
    """Parameters as Syms (their nodes in the graph), BN statistics per ``bn_mode``."""

    def __init__(self, gm: fx.GraphModule, emitter: Emitter, numeric: NumericValues, mode: BnMode) -> None:
        self.gm, self.emitter, self.numeric, self.mode = gm, emitter, numeric, mode
        self.dtype = numeric.dtype
        self.entry: fx.Node | None = None
        self._moments: dict[fx.Node, fx.Node] = {}

    def param(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            value = self.numeric.param(arg)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                # a number computed from parameter values at run time (``self.alpha.item()``): the graph
                # reads it every step rather than keeping today's value
                return self.emitter.call(torch.as_tensor, (self.emitter.wrap(arg, value),), {"dtype": self.dtype})
            return self.emitter.wrap(arg, value) if isinstance(value, torch.Tensor) else value
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.param(a) for a in arg)
        return arg

    def bn(self, node: fx.Node, module: nn.Module, before: AffineConv | None) -> AffineConv | NoMatch:
        if module.running_mean is None or not module.track_running_stats:
            return NoMatch("BatchNorm with track_running_stats=False")
        graph = self.emitter.graph
        module_ref = BatchNormView.of(node).module
        moments = None
        if self.mode is BnMode.ESTIMATE:  # the block input's moments, computed once per block
            if self.entry not in self._moments:
                self._moments[self.entry] = graph.call_function(input_moments, (self.entry, module_ref))
            moments = self._moments[self.entry]
        branch = Branch.of(before, self._node)  # the argument order: bn_graph.StatisticsCall
        stats = graph.call_function(branch_statistics, (self.entry, branch, module_ref, self.mode, moments))
        stats = self.emitter.wrap(stats, (module.running_mean.to(self.dtype), module.running_var.to(self.dtype)))
        path = module_ref.target
        weight = self._attr(f"{path}.weight") if module.weight is not None else None
        bias = self._attr(f"{path}.bias") if module.bias is not None else None
        # R1 as one call: block_statistics may have folded it already, stacked with the block's other BNs
        scale, shift = self.emitter.call(bn_fold, (stats, weight, bias, module.eps), {})
        base = path.replace(".", "_")
        for sym, what in ((scale, "scale"), (shift, "shift")):
            sym.node._rename(f"{base}_{what}")
        scale.node.args[0]._rename(f"{base}_fold")
        return ops.diagonal(scale, shift)

    def _node(self, value: Any) -> Any:
        """A Sym's node; a plain tensor (a fixed kernel: avg-pool, identity) as a constant buffer."""
        value = node_of(value)
        return self.emitter.constant(value) if isinstance(value, torch.Tensor) else value

    def _attr(self, target: str) -> Sym:
        value = fetch_attr(self.gm, target).detach().to(self.dtype)
        return self.emitter.wrap(self.emitter.graph.get_attr(target), value)


def prepare_graph(gm: fx.GraphModule, config: QConfig, analysis: Analysis | None = None) -> fx.GraphModule:
    """Rewrite ``gm`` (canonical, in place) into the RepQ QAT graph."""
    analysis = analysis or find_blocks(gm)
    _check_skip(gm, config)
    dtype = param_dtype(gm)
    emitter = Emitter(gm, recorded_as=_RECORDED_AS)
    numeric = NumericValues(gm, dtype=dtype)
    quantized: list[tuple[fx.Node, str]] = []  # (conv/linear node, module path for its quantizers)
    replaced: dict[fx.Node, fx.Node] = {}
    # entry widths before any rewrite: a rewritten block's exit loses the users they are read from
    widths = {block.region.exit: entry_channels(gm, block.region, analysis.linear, numeric)
              for block in analysis.blocks if block.merged}
    for block in analysis.blocks:
        if not block.merged or _skipped(block.name, config) or _skipped(block.module_scope, config):
            continue
        for conv in _emit_block(gm, block, analysis, emitter, numeric, config, replaced, widths[block.region.exit]):
            quantized.append((conv, block.module_scope))
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.linear and node.args[1].op == "get_attr":
            path = node.args[1].target.rpartition(".")[0]
            if not _skipped(path, config):
                quantized.append((node, path))
    insert_weight_quantizers_for_linears(gm, quantized, config)
    insert_act_quantizers(gm, quantized, config)
    share_block_statistics(gm)
    _fuse_embed_adds(gm)
    gm.graph.eliminate_dead_code()
    snapshot_running_stats(gm)
    gm.delete_all_unused_submodules()
    keep_weights_float32(gm)  # M(theta) in float32 under torch.autocast: the grid does not follow the compute dtype
    for path, module in gm.named_modules():  # so that a quantizer's warnings can name it
        if isinstance(module, (ActFakeQuant, WeightFakeQuant)):
            module.path = path
    gm.graph.lint()
    gm.recompile()
    return gm


def _emit_block(gm, block: Block, analysis: Analysis, emitter: Emitter, numeric: NumericValues,
                config: QConfig, replaced: dict, channels: int | None) -> list[fx.Node]:
    """Replace ``block`` by ``conv2d(x, Q_w(M(theta)), b(theta))`` (or a channel concat of such convs, one
    per concatenated branch); returns the conv nodes."""
    region = block.region
    entry = replaced.get(region.entry, region.entry)
    values = SymValues(gm, emitter, numeric, BnMode(config.bn_mode))
    values.entry = entry
    base = (block.module_scope or "block").replace(".", "_")
    with gm.graph.inserting_before(region.exit):
        merged = evaluate(region, analysis.linear, values, channels)
        params = finalized(merged)
        convs_params = params if isinstance(params, tuple) else (params,)
        if not all(hasattr(p, "weight") for p in convs_params):
            raise AssertionError(f"block {block.name} merged numerically but not symbolically: {params}")
        convs = [_emit_conv(gm, block, emitter, config, entry, p, base + (f"_{i}" if len(convs_params) > 1 else ""))
                 for i, p in enumerate(convs_params)]
        out = convs[0] if len(convs) == 1 else gm.graph.call_function(torch.cat, (convs, 1))
    out.meta = dict(region.exit.meta)
    region.exit.replace_all_uses_with(out)
    replaced[region.exit] = out
    return convs


def _emit_conv(gm: fx.GraphModule, block: Block, emitter: Emitter, config: QConfig, entry: fx.Node,
               params: Any, base: str) -> fx.Node:
    weight = params.weight if isinstance(params.weight, Sym) else emitter.wrap(
        emitter.constant(params.weight), params.weight)
    weight.node._rename(f"{base}_merged_weight")
    bias = node_of(params.bias)
    if isinstance(bias, fx.Node):
        bias._rename(f"{base}_merged_bias")
    elif isinstance(bias, torch.Tensor):
        bias = emitter.constant(bias)
    quant_path = add_weight_quantizer(gm, block.module_scope, params.out_channels, config)
    wq = gm.graph.call_module(quant_path, (weight.node,))
    conv = gm.graph.create_node("call_function", F.conv2d,
                                (entry, wq, bias, params.stride, params.padding, params.dilation, params.groups),
                                name=f"{base}_conv")
    conv.meta = dict(block.region.exit.meta) if not block.parts else {}
    return conv


# ops whose autograd keeps their inputs, not their output: a later in-place add into the output is safe
_OUTPUT_NOT_SAVED = (operator.mul, operator.add, operator.sub, operator.neg, torch.mul, torch.add, torch.sub)


def _fuse_embed_adds(gm: fx.GraphModule) -> None:
    """``embed_add(embed_add(w, k1), k2)`` -> ``embed_add(w, k1 + k2)`` when the inner sum has no other use.

    A block's sum of branches is a chain of binary adds (RepVGG: ``kxk + 1x1``, then ``+ identity``);
    one call copies the frame kernel once instead of once per add, and none when the frame is a
    temporary of this sum (the 3x3 kernel scaled by its BN).
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not embed_add:
            continue
        inner = node.args[0]
        if not (isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target is embed_add
                and len(inner.users) == 1 and inner.args[4] == node.args[4]):
            continue
        node.args = (inner.args[0], inner.args[1] + node.args[1], inner.args[2] + node.args[2],
                     inner.args[3] + node.args[3], node.args[4])
        gm.graph.erase_node(inner)
    for node in gm.graph.nodes:  # add into the frame kernel itself where it is a temporary of this sum only
        if node.op == "call_function" and node.target is embed_add:
            frame = node.args[0]
            if (isinstance(frame, fx.Node) and len(frame.users) == 1 and frame.op == "call_function"
                    and frame.target in _OUTPUT_NOT_SAVED):
                node.kwargs = {**node.kwargs, "inplace": True}


def _skipped(name: str, config: QConfig) -> bool:
    return any(name == s or name.startswith(s + ".") for s in config.skip)


def _check_skip(gm: fx.GraphModule, config: QConfig) -> None:
    names = {n for n, _ in gm.named_modules()}
    for s in config.skip:
        if s not in names:
            close = sorted(n for n in names if n and (s in n or n in s))[:5]
            raise ConfigError(f"QConfig.skip names module {s!r}, which the model does not have"
                              + (f"; similar: {close}" if close else ""))


__all__ = ["prepare_graph", "SymValues"]
