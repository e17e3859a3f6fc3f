"""The prepare pass: each block becomes ``conv2d(Q_a(x), Q_w(M(theta)), b(theta))`` (RepQ).

``M(theta)`` is the block's merged weight, emitted as FX nodes on the block's own
parameters by running the algebra on :class:`~repq_fx.passes.emit.Sym` values. BN
statistics inside the block come from ``quant.bn_stats.branch_statistics`` (batch,
estimated or running, following ``.train()``/``.eval()`` at run time). Linears are
quantized the same way. Activation fake quants sit where ONNX Runtime quantizes a
QDQ model: on the input of every quantized conv/linear and on its output (after a
ReLU that ONNX Runtime fuses into the conv). A target with ``quantize_add_inputs``
(TensorRT) quantizes the other input of a residual add that a conv feeds instead of
that conv's output (see :func:`_fused_adds`).

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

from ..algebra import AffineConv, NoMatch, ops
from ..algebra.kernels import embed_add
from ..config import QConfig
from ..errors import ConfigError
from ..targets import get_target
from ..capture.graph_utils import fetch_attr, free_module_path, param_dtype
from ..patterns.blocks import Analysis, Block, NumericValues, entry_channels, evaluate, finalized, find_blocks
from ..quant.bn_stats import block_statistics, bn_fold, branch_statistics, input_moments
from ..quant.fake_quant import ActFakeQuant, WeightFakeQuant
from .emit import Emitter, Sym, node_of
from .float32_weights import keep_weights_float32

_RELUS = (nn.ReLU,)
_RELU_FUNCTIONS = (F.relu, torch.relu)


class SymValues:
    """Parameters as Syms (their nodes in the graph), BN statistics per ``bn_mode``."""

    def __init__(self, gm: fx.GraphModule, emitter: Emitter, numeric: NumericValues, mode: str) -> None:
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
        module_ref = node.args[1]
        geometry: tuple[Any, ...]
        if before is None:
            geometry = (None, None, (1, 1), ((0, 0), (0, 0)), (1, 1), 1, None)
        else:
            geometry = (self._node(before.weight), self._node(before.bias), before.stride, before.padding,
                        before.dilation, before.groups, self._node(before.pad_value))
        moments = None
        if self.mode == "estimate":  # the block input's moments, computed once per block
            if self.entry not in self._moments:
                self._moments[self.entry] = graph.call_function(input_moments, (self.entry, module_ref))
            moments = self._moments[self.entry]
        stats = graph.call_function(branch_statistics, (self.entry, *geometry, module_ref, self.mode, moments))
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
    emitter = Emitter(gm)
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
    _insert_weight_quantizers_for_linears(gm, quantized, config)
    _insert_act_quantizers(gm, quantized, config)
    _share_block_statistics(gm)
    _fuse_embed_adds(gm)
    gm.graph.eliminate_dead_code()
    _snapshot_running_stats(gm)
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
    values = SymValues(gm, emitter, numeric, config.bn_mode)
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
    quant_path = free_module_path(gm, f"{block.module_scope}.weight_fake_quant" if block.module_scope else "weight_fake_quant")
    gm.add_submodule(quant_path, WeightFakeQuant(config.weight_bits, params.out_channels,
                                                 config.weight_quantizer == "lsq", config.per_channel,
                                                 config.step_init))
    wq = gm.graph.call_module(quant_path, (weight.node,))
    conv = gm.graph.create_node("call_function", F.conv2d,
                                (entry, wq, bias, params.stride, params.padding, params.dilation, params.groups),
                                name=f"{base}_conv")
    conv.meta = dict(block.region.exit.meta) if not block.parts else {}
    return conv


def _share_block_statistics(gm: fx.GraphModule) -> None:
    """The BNs that read one block input get their train-mode statistics from one ``block_statistics``.

    Each ``branch_statistics`` node stays (eval mode and ``lower`` read the running statistics
    through it) and receives its BN's ``BranchStatistics`` as its last argument. A BN joins a
    group when everything it reads is computed before the group's first BN, so the shared node
    can run first: the BNs of parallel branches do, a BN behind another BN of the same block
    (a 1x1 -> BN -> kxk -> BN chain) does not and starts a group of its own.
    """
    graph = gm.graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if (node.op == "call_function" and node.target is branch_statistics and len(node.args) == 11
                and node.args[9] in ("batch", "estimate")):
            by_input.setdefault(node.args[0], []).append(node)
    for x, members in by_input.items():
        group: list[fx.Node] = []
        for node in members + [None]:
            reads = [] if node is None else [a for a in node.args[1:9] if isinstance(a, fx.Node)]
            if node is not None and group and node.args[9] == group[0].args[9] and all(
                    position[a] < position[group[0]] for a in reads):
                group.append(node)
                continue
            if len(group) > 1:
                paths = [m.args[8].target.split(".") if m.args[8].op == "get_attr" else [] for m in group]
                common = [p[0] for p in zip(*paths) if all(q == p[0] for q in p)]
                with graph.inserting_before(group[0]):
                    shared = graph.call_function(
                        block_statistics, (x, tuple(tuple(m.args[1:8]) for m in group),
                                           tuple(m.args[8] for m in group), group[0].args[9]))
                    shared._rename("_".join(common + ["statistics"]))
                    for i, member in enumerate(group):
                        item = graph.call_function(operator.getitem, (shared, i))
                        if paths[i]:
                            item._rename("_".join(paths[i] + ["statistics"]))
                        member.update_arg(10, item)
            group = [node] if node is not None else []


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


def _snapshot_running_stats(gm: fx.GraphModule) -> None:
    """Weight functions read BN running statistics through a clone.

    ``branch_statistics`` updates them in place in train mode, as ``nn.BatchNorm2d`` does;
    a merged weight that read them directly (DBB's BN-valued padding) would have its saved
    tensors invalidated for backward.
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


def _insert_weight_quantizers_for_linears(gm: fx.GraphModule, quantized: list, config: QConfig) -> None:
    for node, path in quantized:
        if node.target is not F.linear:
            continue
        weight = node.args[1]
        out_features = fetch_attr(gm, weight.target).shape[0]
        quant_path = free_module_path(gm, f"{path}.weight_fake_quant" if path else "weight_fake_quant")
        gm.add_submodule(quant_path, WeightFakeQuant(config.weight_bits, out_features, config.weight_quantizer == "lsq",
                                                     config.per_channel, config.step_init))
        with gm.graph.inserting_before(node):
            wq = gm.graph.call_module(quant_path, (weight,))
        node.update_arg(1, wq)


def _insert_act_quantizers(gm: fx.GraphModule, quantized: list, config: QConfig) -> None:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    quantized = sorted(quantized, key=lambda q: order[q[0]])
    first = {q[0] for q in quantized if _reads_model_input(q[0])}
    last = {quantized[-1][0]} if quantized else set()
    learned = config.act_quantizer == "lsq"
    target = get_target(config.target)
    fused = _fused_adds(gm, quantized) if target.quantize_add_inputs else {}

    def act_quantizer(bits: int) -> ActFakeQuant:
        return ActFakeQuant(bits, learned, init=config.step_init, signed=target.symmetric_activations)

    def bits_of(node: fx.Node) -> tuple[int, int]:
        if config.first_last_bits is not None and (node in first or node in last):
            return config.first_last_bits, config.first_last_bits
        return config.weight_bits, config.act_bits

    quant_outputs: set[fx.Node] = set()
    for node, path in quantized:
        if node in fused:  # its output goes into the add (the next quantizer quantizes what follows)
            continue
        out = node
        users = list(node.users)
        if len(users) == 1 and _is_relu(gm, users[0]):
            out = users[0]
        a_bits = bits_of(node)[1] if node in last else config.act_bits
        quant_path = free_module_path(gm, f"{path}.output_fake_quant" if path else "output_fake_quant")
        gm.add_submodule(quant_path, act_quantizer(a_bits))
        with gm.graph.inserting_after(out):
            fq = gm.graph.call_module(quant_path, (out,))
        out.replace_all_uses_with(fq, delete_user_cb=lambda u: u is not fq)
        quant_outputs.add(fq)
    inputs: dict[fx.Node, fx.Node] = {}
    for node, path in quantized:
        x = node.args[0]
        if x in quant_outputs:
            continue
        if x not in inputs:
            name = "input_fake_quant" if x.op == "placeholder" else f"{x.name}_fake_quant"
            quant_path = free_module_path(gm, name if x.op == "placeholder" or not path else f"{path}.input_fake_quant")
            gm.add_submodule(quant_path, act_quantizer(bits_of(node)[1]))
            with gm.graph.inserting_after(x):
                inputs[x] = gm.graph.call_module(quant_path, (x,))
            for user in list(x.users):  # BN statistics see what the conv sees
                if user.target in (branch_statistics, input_moments):
                    user.update_arg(0, inputs[x])
        node.update_arg(0, inputs[x])
    paths = dict(quantized)
    for conv, add in fused.items():  # the add's other input: on a grid, as the int8 residual of the fused kernel
        i = 1 - add.args.index(conv)
        add.update_arg(i, _quantized_value(gm, add.args[i], paths[conv], act_quantizer(config.act_bits)))
    for node, _ in quantized:  # each weight grid: its bit width, narrowed by the target for its input's range
        wq, aq = gm.get_submodule(node.args[1].target), gm.get_submodule(node.args[0].target)
        bits = bits_of(node)[0]
        wq.set_grid(bits, *target.weight_range(bits, aq.quant_max))


_ADDS = (operator.add, torch.add)


def _fused_adds(gm: fx.GraphModule, quantized: list) -> dict[fx.Node, fx.Node]:
    """``{conv: add}`` for every residual add that a quantized conv feeds alone: ``add(conv(x), other)``
    with tensors only (BN after the conv is folded into it by then). TensorRT fuses conv + add (+ ReLU)
    into one int8 kernel when ``other`` comes through a Q/DQ pair and nothing quantizes the conv's
    output before the add (a Q/DQ pair there splits the conv from the add: TensorRT's Q/DQ placement
    guide). Where both inputs are such convs, the first is fused and the second keeps its output
    quantizer."""
    convs = {node for node, _ in quantized if node.target is F.conv2d}
    fused: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
            continue
        conv = next((x for x in (a, b) if x in convs and list(x.users) == [node]), None)
        if conv is not None:
            fused[conv] = node
    return fused


def _quantized_value(gm: fx.GraphModule, value: fx.Node, path: str, quantizer: ActFakeQuant) -> fx.Node:
    """``value`` on an activation grid: ``value`` itself if a quantizer computes it, the quantizer that
    already reads it (a conv's input quantizer: one Q/DQ for both uses), else ``quantizer``, added after it
    as ``<path>.residual_fake_quant``."""
    def is_quantizer(n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(gm.get_submodule(n.target), ActFakeQuant)

    if is_quantizer(value):
        return value
    existing = next((u for u in value.users if is_quantizer(u)), None)
    if existing is not None:
        return existing
    quant_path = free_module_path(gm, f"{path}.residual_fake_quant" if path else "residual_fake_quant")
    gm.add_submodule(quant_path, quantizer)
    with gm.graph.inserting_after(value):
        return gm.graph.call_module(quant_path, (value,))


def _reads_model_input(node: fx.Node) -> bool:
    x = node.args[0]
    return isinstance(x, fx.Node) and x.op == "placeholder"


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _RELUS)
    return node.op == "call_function" and node.target in _RELU_FUNCTIONS


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
