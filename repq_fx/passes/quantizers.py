"""Where ``prepare`` puts fake quantizers: on the weight of every quantized conv/linear, and on activations.

Activation fake quants sit where ONNX Runtime quantizes a QDQ model: on the input of every
quantized conv/linear and on its output (after a ReLU that ONNX Runtime fuses into the conv).
A target with ``quantize_add_inputs`` (TensorRT) quantizes the other input of a residual add that
a conv feeds instead of that conv's output (see :func:`_fused_adds`).

>>> import torch.nn as nn, repq_fx
>>> gm = repq_fx.prepare(nn.Sequential(nn.Linear(4, 4)))
>>> sorted(n for n, m in gm.named_modules() if n.endswith("fake_quant"))
['0.output_fake_quant', '0.weight_fake_quant', 'input_fake_quant']
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..ir import fetch_attr, free_module_path
from ..config import QConfig
from ..quant.bn_stats import branch_statistics, input_moments
from ..quant.fake_quant import ActFakeQuant, WeightFakeQuant
from ..targets import get_target

_RELUS = (nn.ReLU,)
_RELU_FUNCTIONS = (F.relu, torch.relu)


def add_weight_quantizer(gm: fx.GraphModule, path: str, channels: int, config: QConfig) -> str:
    """A ``WeightFakeQuant`` for ``channels`` output channels as ``<path>.weight_fake_quant`` (a free
    name); returns its path.

    >>> import torch.fx as fx, torch.nn as nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 3)))
    >>> add_weight_quantizer(gm, "0", 3, QConfig()), add_weight_quantizer(gm, "0", 3, QConfig())
    ('0.weight_fake_quant', '0.weight_fake_quant_1')
    """
    quant_path = free_module_path(gm, f"{path}.weight_fake_quant" if path else "weight_fake_quant")
    gm.add_submodule(quant_path, WeightFakeQuant(config.weight_bits, channels, config.weight_quantizer == "lsq",
                                                 config.per_channel, config.step_init))
    return quant_path


def insert_weight_quantizers_for_linears(gm: fx.GraphModule, quantized: list, config: QConfig) -> None:
    """A weight quantizer between each quantized linear of ``quantized`` (``(node, path)``) and its weight
    (see the module's example)."""
    for node, path in quantized:
        if node.target is not F.linear:
            continue
        weight = node.args[1]
        quant_path = add_weight_quantizer(gm, path, fetch_attr(gm, weight.target).shape[0], config)
        with gm.graph.inserting_before(node):
            wq = gm.graph.call_module(quant_path, (weight,))
        node.update_arg(1, wq)


def insert_act_quantizers(gm: fx.GraphModule, quantized: list, config: QConfig) -> None:
    """Activation quantizers on the inputs and outputs of ``quantized`` (``(node, path)``), and each
    weight grid narrowed for its target and input range (see the module's example)."""
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


__all__ = ["add_weight_quantizer", "insert_act_quantizers", "insert_weight_quantizers_for_linears"]
