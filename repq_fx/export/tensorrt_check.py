"""Does a QDQ ONNX file have the form TensorRT's explicit quantization runs in int8? A static check.

TensorRT builds int8 kernels from the Q/DQ pairs of the file (explicit quantization) and accepts only
symmetric ones: zero point 0, int8 (activations saturate to [-128, 127], weights [-127, 127]). It fuses
a ``DequantizeLinear`` into the conv that reads it, and a residual add (and the ReLU after it) into the
conv that feeds it when the add's other input comes through a ``DequantizeLinear``. Each rule below
reads only the ONNX graph and returns what breaks it, in words; which rules apply follows from the
target's flags (:data:`RULES`), so ``export_onnx(..., check=True)`` checks what its target asks for.

>>> import onnx
>>> from onnx import TensorProto, helper
>>> nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
...          helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
>>> inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
...          helper.make_tensor("zp", TensorProto.UINT8, [], [128])]   # ONNX Runtime's asymmetric uint8
>>> graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
...                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
>>> check_tensorrt_qdq(helper.make_model(graph))   # doctest: +NORMALIZE_WHITESPACE
["QuantizeLinear 'q': zero point 'zp' is uint8 128; TensorRT needs int8 0 (symmetric)",
 "DequantizeLinear 'y': zero point 'zp' is uint8 128; TensorRT needs int8 0 (symmetric)"]
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from ..errors import ExportCheckError, first_few
from ..targets import Target, get_target

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_WEIGHTED = ("Conv", "Gemm")


class _Graph:
    """Who produces each tensor, and the value and type of every constant (initializer or Constant node)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.constants: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = value

    def made_by(self, name: str, op_type: str) -> bool:
        node = self.producer.get(name)
        return node is not None and node.op_type == op_type

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def dtype(self, name: str) -> str:
        tensor = self.constants.get(name)
        return "?" if tensor is None else onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.output[0]!r}"


def _zero_point_problem(graph: _Graph, node: onnx.NodeProto) -> str | None:
    if len(node.input) < 3 or not node.input[2]:
        return f"{_label(node)}: no zero point (ONNX then means uint8); TensorRT needs an int8 zero point of 0"
    zp, name = graph.array(node.input[2]), node.input[2]
    if zp is None:
        return f"{_label(node)}: zero point {name!r} is not a constant; TensorRT needs an int8 constant 0"
    if zp.dtype != np.int8 or np.any(zp != 0):
        shown = f"{zp.dtype.name} {zp.reshape(-1)[0]}" if zp.size else zp.dtype.name
        return f"{_label(node)}: zero point {name!r} is {shown}; TensorRT needs int8 0 (symmetric)"
    return None


def symmetric_activations(graph: _Graph) -> list[str]:
    """Every activation ``QuantizeLinear``/``DequantizeLinear``: an int8 zero point 0, and the pair
    adjacent (a ``Clip`` between them, from a grid narrower than int8, splits what TensorRT fuses)."""
    problems = []
    for node in graph.nodes:
        if node.op_type not in _QDQ or node.input[0] in graph.constants:
            continue  # constant inputs are weights and biases: see narrow_weights
        problem = _zero_point_problem(graph, node)
        if problem:
            problems.append(problem)
        if node.op_type == "DequantizeLinear" and graph.made_by(node.input[0], "Clip"):
            problems.append(f"{_label(node)}: reads a Clip of a QuantizeLinear (a grid narrower than int8, "
                            "act_bits < 8); TensorRT quantizes activations to the full int8 range only")
    return problems


def narrow_weights(graph: _Graph) -> list[str]:
    """The weight of every Conv/Gemm that is dequantized: int8 in [-127, 127], zero point 0, per output
    channel (``axis=0``, one scale per channel) or per tensor."""
    problems = []
    for layer in graph.nodes:
        if layer.op_type not in _WEIGHTED or len(layer.input) < 2 or not graph.made_by(layer.input[1],
                                                                                      "DequantizeLinear"):
            continue
        dq = graph.producer[layer.input[1]]
        weight = graph.array(dq.input[0])
        if weight is None:
            problems.append(f"{_label(layer)}: its weight {dq.input[0]!r} is not a constant")
            continue
        if weight.dtype != np.int8:
            problems.append(f"{_label(layer)}: weight {dq.input[0]!r} is {weight.dtype.name}; TensorRT needs int8")
        elif weight.size and int(weight.min()) < -127:
            problems.append(f"{_label(layer)}: weight {dq.input[0]!r} holds -128; TensorRT's int8 weights are "
                            "[-127, 127] (train with the 'tensorrt' target)")
        problem = _zero_point_problem(graph, dq)
        if problem:
            problems.append(problem)
        scale = graph.array(dq.input[1])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if scale is not None and scale.size > 1 and (axis != 0 or scale.size != weight.shape[0]):
            problems.append(f"{_label(layer)}: weight scales {dq.input[1]!r} ({scale.size}) are not one per "
                            f"output channel on axis 0 (axis={axis}, {weight.shape[0]} channels)")
    return problems


def conv_inputs(graph: _Graph, float_convs: bool = False) -> list[str]:
    """Every Conv reads its input and its weight from a ``DequantizeLinear`` (where TensorRT takes the
    int8 kernel from); with ``float_convs``, a conv whose input and weight are both float (a layer left
    in float on purpose) is accepted."""
    problems = []
    for layer in graph.nodes:
        if layer.op_type != "Conv":
            continue
        dequantized = [graph.made_by(name, "DequantizeLinear") for name in layer.input[:2]]
        if all(dequantized) or (float_convs and not any(dequantized)):
            continue
        missing = " and ".join(what for what, ok in zip(("input", "weight"), dequantized) if not ok)
        problems.append(f"{_label(layer)}: its {missing} does not come from a DequantizeLinear, so TensorRT runs "
                        "it in float")
    return problems


def add_inputs(graph: _Graph) -> list[str]:
    """Every Add that a Conv feeds (directly, or through a Q/DQ pair): its other inputs come from a
    ``DequantizeLinear`` (the int8 residual TensorRT fuses into the conv's kernel), and one conv feeds it
    directly (a Q/DQ pair between the conv and the add splits them into two kernels: TensorRT's Q/DQ
    placement guide)."""
    problems = []
    for node in graph.nodes:
        if node.op_type != "Add":
            continue
        direct = [name for name in node.input if graph.made_by(name, "Conv")]
        through_qdq = [name for name in node.input if _dequantized_conv(graph, name)]
        if not direct and not through_qdq:
            continue
        if not direct:
            problems.append(f"{_label(node)}: the Conv output {through_qdq[0]!r} is quantized before the add, "
                            "which keeps TensorRT from fusing the add into the conv")
        conv = (direct or through_qdq)[0]
        for name in node.input:
            if name != conv and not graph.made_by(name, "DequantizeLinear"):
                problems.append(f"{_label(node)}: adds {name!r} to the output of a Conv without a Q/DQ pair on "
                                f"it, so TensorRT cannot fuse the add into the conv in int8")
    return problems


def _dequantized_conv(graph: _Graph, name: str) -> bool:
    """``name`` is ``DequantizeLinear(QuantizeLinear(conv output))``."""
    dq = graph.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or not graph.made_by(dq.input[0], "QuantizeLinear"):
        return False
    return graph.made_by(graph.producer[dq.input[0]].input[0], "Conv")


# which rules a target's flags ask for
RULES: tuple[tuple[str, Callable[..., list[str]]], ...] = (
    ("symmetric_activations", symmetric_activations),
    ("narrow_weights", narrow_weights),
    ("narrow_weights", conv_inputs),
    ("quantize_add_inputs", add_inputs),
)


def structure_problems(model: onnx.ModelProto, target: Target, float_convs: bool = False) -> list[str]:
    """What in ``model`` breaks the rules ``target`` asks for (:data:`RULES`); empty: none. A target
    without any of the flags (ONNX Runtime's) has no rules here.

    >>> structure_problems(onnx.ModelProto(), get_target("onnxruntime"))
    []
    """
    graph = _Graph(model)
    problems: list[str] = []
    for flag, rule in RULES:
        if getattr(target, flag):
            problems += rule(graph, float_convs) if rule is conv_inputs else rule(graph)
    return problems


def check_tensorrt_qdq(model: onnx.ModelProto, float_convs: bool = False) -> list[str]:
    """The problems TensorRT's explicit int8 quantization has with ``model`` (see the module docstring);
    an empty list when there are none. ``float_convs``: convs left in float on purpose are fine."""
    return structure_problems(model, get_target("tensorrt"), float_convs)


def require_target_form(model: onnx.ModelProto, path: str, lowered: fx.GraphModule, target: Target) -> bool:
    """Raise :class:`~repq_fx.errors.ExportCheckError` listing the problems when ``model`` (written at ``path``
    from ``lowered``) breaks a structural rule of ``target``; return whether ``target`` has any such rule."""
    problems = structure_problems(model, target, float_convs=has_float_convs(lowered))
    if problems:
        listed = first_few(problems)
        raise ExportCheckError(f"{path} does not have the form target {target.name!r} runs in int8: {listed}")
    return any(getattr(target, flag) for flag, _ in RULES)


def has_float_convs(lowered: fx.GraphModule) -> bool:
    """Whether a lowered model still runs a float conv (a layer left in float by ``QConfig.skip``).

    >>> has_float_convs(fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 1, 1))))
    True
    """
    for node in lowered.graph.nodes:
        if node.op == "call_module" and isinstance(lowered.get_submodule(node.target), nn.Conv2d):
            return True
        if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            return True
    return False


__all__ = ["RULES", "structure_problems", "check_tensorrt_qdq", "has_float_convs", "symmetric_activations",
           "narrow_weights", "conv_inputs", "add_inputs"]
