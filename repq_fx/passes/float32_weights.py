"""Keep a prepared graph's weight synthesis in float32 under ``torch.autocast``.

The nodes that compute a quantized layer's weight ``M(theta)`` and bias ``b(theta)`` from the
parameters (and the BN statistics) are found by walking back from each weight fake quantizer and
from the bias of each quantized conv/linear, stopping at the data: placeholders, modules, and the
data input of the BN statistics functions (which are float32 functions themselves, see
:mod:`repq_fx.quant.bn_stats`). Every autocast-affected op among them (``F.conv2d`` composing
kernels, matrix products) is replaced by its float32 twin from
:data:`repq_fx.quant.precision.FLOAT32_OPS`: the same values without autocast, float32 values
under it. The data path is not touched.

>>> import torch.nn as nn, torch.nn.functional as F, repq_fx
>>> from repq_fx.testing.blocks import DiverseBranchBlock
>>> from repq_fx.quant import precision
>>> gm = repq_fx.prepare(nn.Sequential(DiverseBranchBlock(2, 4, 3)))   # kernels composed by convs
>>> [sum(n.target is op for n in gm.graph.nodes) for op in (precision.conv2d, F.conv2d)]   # weight, data
[4, 1]
"""
from __future__ import annotations

import torch.fx as fx

from ..quant.bn_stats import block_statistics, branch_statistics, input_moments
from ..quant.fake_quant import WeightFakeQuant
from ..quant.precision import FLOAT32_OPS

__all__ = ["keep_weights_float32", "weight_synthesis"]

_STATISTICS = (block_statistics, branch_statistics, input_moments)  # arg 0 is the data they summarize


def weight_synthesis(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes that compute the weights and biases of the quantized layers of ``gm``.

    >>> import torch.nn as nn, repq_fx
    >>> gm = repq_fx.prepare(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    >>> sorted(n.op for n in weight_synthesis(gm))[:2]
    ['call_function', 'call_function']
    """
    roots: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), WeightFakeQuant):
            roots.append(node.args[0])
            for user in node.users:  # the layer's bias
                if user.op == "call_function" and len(user.args) > 2 and isinstance(user.args[2], fx.Node):
                    roots.append(user.args[2])
    seen: set[fx.Node] = set()
    while roots:
        node = roots.pop()
        if not isinstance(node, fx.Node) or node in seen or node.op in ("placeholder", "call_module"):
            continue
        seen.add(node)
        inputs = node.all_input_nodes
        if node.op == "call_function" and node.target in _STATISTICS:
            data = node.args[0]
            inputs = [a for a in inputs if a is not data]
        roots.extend(inputs)
    return seen


def keep_weights_float32(gm: fx.GraphModule) -> int:
    """Replace the autocast-affected ops of ``gm``'s weight synthesis by float32 twins, in place;
    returns how many. Call ``gm.recompile()`` afterwards.

    >>> import torch.nn as nn, repq_fx
    >>> keep_weights_float32(repq_fx.prepare(nn.Sequential(nn.Conv2d(1, 2, 3))))   # nothing composes kernels
    0
    """
    count = 0
    for node in weight_synthesis(gm):
        if node.op == "call_function" and node.target in FLOAT32_OPS:
            node.target = FLOAT32_OPS[node.target]
            count += 1
    return count
