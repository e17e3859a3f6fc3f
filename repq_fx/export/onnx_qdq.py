"""QDQ ONNX from a lowered GraphModule, built node by node with ``onnx.helper``.

Every node of the lowered graph is turned into ONNX by a rule looked up in a table
(by module type for ``call_module``, by function for ``call_function``, by name for
``call_method``); a node without a rule raises :class:`~repq_fx.errors.ExportError`
naming the node and its op. The quantized layers come out in the standard QDQ form
that ONNX Runtime fuses into integer kernels:

- ``QuantizeDequantize`` -> ``QuantizeLinear`` -> ``DequantizeLinear`` (uint8 or int8,
  per tensor; with an integer ``Clip`` between them when the grid is narrower than the 8-bit
  container, e.g. 4-bit activations, which keeps the ``QuantizeLinear`` fusable);
- ``QuantizedConv2d`` -> ``DequantizeLinear`` of the int8 weight (per channel, axis 0) and of
  the int32 bias (scale ``s_x * s_w``) -> ``Conv``; ``QuantizedLinear`` likewise -> ``Gemm``.

>>> import torch, torch.nn as nn, repq_fx, tempfile, os, onnx
>>> qmodel = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
>>> _ = repq_fx.calibrate(qmodel, [torch.randn(2, 3, 8, 8)])
>>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
>>> model = export_qdq(repq_fx.lower(qmodel), (torch.randn(1, 3, 8, 8),), path)
>>> [n.op_type for n in model.graph.node]
['QuantizeLinear', 'DequantizeLinear', 'DequantizeLinear', 'DequantizeLinear', 'Conv', 'Relu', 'QuantizeLinear', 'DequantizeLinear']
"""
from __future__ import annotations

import json
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch.fx.passes.shape_prop import ShapeProp

from ..capture import norm
from ..capture.graph_utils import fetch_attr
from ..errors import ExportError, SaturationError
from ..targets import DEFAULT_TARGET, Target, get_target
from .saturation import int16_pair_overflows
from ..quant.lowered import QuantizeDequantize, QuantizedConv2d, QuantizedLinear

OPSET = 21
TENSOR_NAMES = "repq_fx.tensor_names"  # metadata key: JSON {FX node name: ONNX tensor name}

Rule = Callable[["_Builder", fx.Node, list], str]
MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}


def _registrar(table: dict, what: str) -> Callable[..., Callable[[Rule], Rule]]:
    def register_for(*keys: Any) -> Callable[[Rule], Rule]:
        def register(rule: Rule) -> Rule:
            for key in keys:
                table[key] = rule
            return rule
        return register
    register_for.__doc__ = f"Register the ONNX rule for {what}, e.g. ``@module_rule(nn.Tanh)``."
    return register_for


module_rule = _registrar(MODULE_RULES, "``call_module`` nodes of these module types")
function_rule = _registrar(FUNCTION_RULES, "``call_function`` nodes with these targets")
method_rule = _registrar(METHOD_RULES, "``call_method`` nodes with these method names")


@dataclass
class _Builder:
    """Collects ONNX nodes and initializers while the graph is walked."""

    gm: fx.GraphModule
    weight_container: str = "int8"  # "uint8": weights stored as w + 128 with zero point 128 (u8u8 kernels)
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    names: dict = field(default_factory=dict)
    _counter: int = 0

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def add(self, op: str, inputs: Sequence[str], hint: str, **attrs: Any) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def rename_output(self, old: str, new: str) -> None:
        """Make the graph output ``new`` the tensor now called ``old`` (an Identity if it is not a node's)."""
        producer = next((n for n in self.nodes if old in n.output), None)
        if producer is None or any(new in n.output for n in self.nodes):
            self.nodes.append(helper.make_node("Identity", [old], [new], name=f"{new}_identity"))
            return
        producer.output[list(producer.output).index(old)] = new
        for n in self.nodes:
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new
        for node, name in self.names.items():
            if name == old:
                self.names[node] = new

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)


def export_qdq(lowered: fx.GraphModule, example_inputs: Sequence[torch.Tensor], path: str | None = None,
               input_names: Sequence[str] | None = None, target: str | None = None) -> onnx.ModelProto:
    """The QDQ ONNX model of ``lowered`` (checked with ``onnx.checker``); saved to ``path`` if given.

    ``target`` (a name in :data:`repq_fx.targets.TARGETS`; default: the one the model was prepared
    for) sets how weights are stored. A weight grid the target's kernels cannot compute exactly is
    refused (:class:`~repq_fx.errors.SaturationError`, naming the layers) or, for a target that is
    exact only on some CPUs, exported with a warning that says which.
    """
    if not isinstance(lowered, fx.GraphModule):
        raise ExportError(f"export_onnx() needs the GraphModule returned by repq_fx.lower; got "
                          f"{type(lowered).__name__}")
    scheme = get_target(target or getattr(lowered, "repq_target", DEFAULT_TARGET))
    _check_pair_sums(lowered, scheme)
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    lowered = lowered.eval()
    with torch.no_grad():
        ShapeProp(lowered).propagate(*example_inputs)
    b = _Builder(lowered, weight_container=scheme.weight_container)
    inputs, outputs = [], []
    placeholders = [n for n in lowered.graph.nodes if n.op == "placeholder"]
    names = list(input_names or (["input"] if len(placeholders) == 1 else [p.name for p in placeholders]))
    for node in lowered.graph.nodes:
        if node.op == "placeholder":
            name = names[len(inputs)]
            inputs.append(_value_info(name, node, batch="N"))
            b.names[node] = name
        elif node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for i, r in enumerate(results):
                name = "output" if len(results) == 1 else f"output_{i}"
                b.rename_output(b.names[r], name)
                outputs.append(_value_info(name, r, batch="N"))
        elif node.op == "get_attr":
            value = fetch_attr(lowered, node.target)
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"node {node.name!r} reads {node.target!r}, a {type(value).__name__}, not a tensor")
            b.names[node] = b.const(node.name, _numpy(value))
        else:
            rule = _rule_for(b, node)
            args = fx.node.map_arg(list(node.args), lambda a: b.names[a])
            b.names[node] = rule(b, node, args)
    graph = helper.make_graph(b.nodes, "repq_fx", inputs, outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="repq_fx")
    model.ir_version = 10
    # which ONNX tensor holds each FX node's value: how repq_fx.export.parity checks layer by layer
    helper.set_model_props(model, {TENSOR_NAMES: json.dumps({n.name: v for n, v in b.names.items()})})
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, path)
    return model


def _check_pair_sums(lowered: fx.GraphModule, scheme: Target) -> None:
    """Refuse (or, for a VNNI-only target, warn about) int8 weights whose 16-bit pair sums can overflow."""
    if scheme.weight_container != "int8":
        return  # u8u8 kernels multiply in 16 bits and accumulate in 32: no pair sums to saturate
    overflows = int16_pair_overflows(lowered)
    if not overflows:
        return
    listed = "; ".join(str(o) for o in overflows[:3]) + (f"; and {len(overflows) - 3} more" if len(overflows) > 3
                                                         else "")
    if scheme.int16_pair_sums:
        raise SaturationError(
            f"{len(overflows)} int8 layers can overflow the 16-bit pair sums of ONNX Runtime's u8s8 kernels on x86 "
            f"CPUs without VNNI ({listed}), so target {scheme.name!r} would run them wrong there. Prepare the model "
            "with QConfig(target='onnxruntime') to train the narrower grid, or export these weights with "
            "target='onnxruntime-u8u8' (exact on every CPU, slower) or 'onnxruntime-vnni' (exact only on VNNI CPUs)")
    warnings.warn(f"target {scheme.name!r}: {len(overflows)} int8 layers are exact only on {scheme.exact_on} "
                  f"({listed})", RuntimeWarning, stacklevel=3)


def _rule_for(b: _Builder, node: fx.Node) -> Rule:
    if node.op == "call_module":
        module = b.module(node)
        for cls in type(module).__mro__:
            if cls in MODULE_RULES:
                return MODULE_RULES[cls]
        what = f"module {node.target!r} ({type(module).__name__})"
    elif node.op == "call_function":
        if node.target in FUNCTION_RULES:
            return FUNCTION_RULES[node.target]
        what = f"function {getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"
    else:
        if node.target in METHOD_RULES:
            return METHOD_RULES[node.target]
        what = f"tensor method .{node.target}()"
    raise ExportError(f"node {node.name!r} calls {what}, which the QDQ ONNX exporter has no rule for; "
                      "register one with repq_fx.export.onnx_qdq.module_rule/function_rule/method_rule, "
                      "or leave the op out of the model")


def _value_info(name: str, node: fx.Node, batch: str) -> onnx.ValueInfoProto:
    meta = node.meta.get("tensor_meta")
    shape: list[Any] = list(meta.shape) if meta is not None else []
    if shape:
        shape[0] = batch
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()


def _shape(node: Any) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


# --- quantized layers -------------------------------------------------------------------------

@module_rule(QuantizeDequantize)
def _qdq(b: _Builder, node: fx.Node, args: list) -> str:
    m: QuantizeDequantize = b.module(node)
    signed = m.quant_min < 0
    container = (-128, 127) if signed else (0, 255)
    dtype = np.int8 if signed else np.uint8
    scale = b.const(f"{node.name}_scale", np.array(m.scale.item(), dtype=np.float32))
    zero = b.const(f"{node.name}_zero_point", np.array(int(m.zero_point), dtype=dtype))
    q = b.add("QuantizeLinear", [args[0], scale, zero], f"{node.name}_q")
    if (m.quant_min, m.quant_max) != container:  # a grid narrower than the 8-bit container:
        # clamp the integers (Clip on uint8/int8), so the Q before it still fuses into the int8 kernel
        lo = b.const(f"{node.name}_qmin", np.array(m.quant_min, dtype=dtype))
        hi = b.const(f"{node.name}_qmax", np.array(m.quant_max, dtype=dtype))
        q = b.add("Clip", [q, lo, hi], f"{node.name}_clip")
    return b.add("DequantizeLinear", [q, scale, zero], f"{node.name}_dq")


def _dequantized_params(b: _Builder, node: fx.Node, m: QuantizedConv2d | QuantizedLinear) -> tuple[str, str | None]:
    out = m.weight.shape[0]
    w_scale = b.const(f"{node.name}_weight_scale", m.weight_scale.cpu().numpy().astype(np.float32))
    if b.weight_container == "uint8":  # the same values, shifted onto uint8 (zero point 128)
        w = b.const(f"{node.name}_weight_uint8", (m.weight.cpu().numpy().astype(np.int16) + 128).astype(np.uint8))
        w_zero = b.const(f"{node.name}_weight_zero_point", np.full(out, 128, dtype=np.uint8))
    else:
        w = b.const(f"{node.name}_weight_int8", m.weight.cpu().numpy())
        w_zero = b.const(f"{node.name}_weight_zero_point", np.zeros(out, dtype=np.int8))
    weight = b.add("DequantizeLinear", [w, w_scale, w_zero], f"{node.name}_weight", axis=0)
    if m.bias is None:
        return weight, None
    bias = b.const(f"{node.name}_bias_int32", m.bias.cpu().numpy().astype(np.int32))
    b_scale = b.const(f"{node.name}_bias_scale", m.output_scale().cpu().numpy().astype(np.float32))
    b_zero = b.const(f"{node.name}_bias_zero_point", np.zeros(out, dtype=np.int32))
    return weight, b.add("DequantizeLinear", [bias, b_scale, b_zero], f"{node.name}_bias", axis=0)


@module_rule(QuantizedConv2d)
def _quantized_conv(b: _Builder, node: fx.Node, args: list) -> str:
    m: QuantizedConv2d = b.module(node)
    weight, bias = _dequantized_params(b, node, m)
    return _conv(b, node.name, args[0], weight, bias, tuple(m.weight.shape[2:]), m.stride, m.padding,
                 m.dilation, m.groups)


@module_rule(QuantizedLinear)
def _quantized_linear(b: _Builder, node: fx.Node, args: list) -> str:
    m: QuantizedLinear = b.module(node)
    weight, bias = _dequantized_params(b, node, m)
    return _gemm(b, node, args[0], weight, bias)


def _conv(b: _Builder, name: str, x: str, weight: str, bias: str | None, kernel: tuple, stride: Any,
          padding: Any, dilation: Any, groups: int) -> str:
    if isinstance(padding, str):
        raise ExportError(f"node {name!r}: padding={padding!r} is not numeric")
    ph, pw = _two(padding)
    return b.add("Conv", [x, weight] + ([bias] if bias is not None else []), f"{name}", kernel_shape=list(kernel),
                 strides=list(_two(stride)), pads=[ph, pw, ph, pw], dilations=list(_two(dilation)), group=int(groups))


def _gemm(b: _Builder, node: fx.Node, x: str, weight: str, bias: str | None) -> str:
    if len(_shape(node.args[0])) != 2:
        raise ExportError(f"node {node.name!r}: a linear layer on a {len(_shape(node.args[0]))}-d input; "
                          "the exporter handles (batch, features) inputs")
    return b.add("Gemm", [x, weight] + ([bias] if bias is not None else []), node.name, transB=1)


def _two(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    return v if len(v) == 2 else (v[0], v[0])


# --- float layers (left unquantized by skip, or never quantized) -----------------------------

@function_rule(F.conv2d)
def _float_conv(b: _Builder, node: fx.Node, args: list) -> str:
    values = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args))
    values.update(fx.node.map_arg(dict(node.kwargs), lambda a: b.names[a]))
    kernel = _shape_of_attr(b, node.args[1])[2:]
    return _conv(b, node.name, values["input"], values["weight"], values.get("bias"), kernel,
                 values.get("stride", 1), values.get("padding", 0), values.get("dilation", 1),
                 values.get("groups", 1))


@module_rule(nn.Conv2d)
def _conv_module(b: _Builder, node: fx.Node, args: list) -> str:
    m: nn.Conv2d = b.module(node)
    if m.padding_mode != "zeros":
        raise ExportError(f"node {node.name!r}: padding_mode={m.padding_mode!r} is not exported")
    weight = b.const(f"{node.name}_weight", _numpy(m.weight))
    bias = b.const(f"{node.name}_bias", _numpy(m.bias)) if m.bias is not None else None
    return _conv(b, node.name, args[0], weight, bias, m.kernel_size, m.stride, m.padding, m.dilation, m.groups)


@function_rule(F.linear)
def _float_linear(b: _Builder, node: fx.Node, args: list) -> str:
    bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
    return _gemm(b, node, args[0], args[1], b.names[bias] if isinstance(bias, fx.Node) else None)


@module_rule(nn.Linear)
def _linear_module(b: _Builder, node: fx.Node, args: list) -> str:
    m: nn.Linear = b.module(node)
    weight = b.const(f"{node.name}_weight", _numpy(m.weight))
    bias = b.const(f"{node.name}_bias", _numpy(m.bias)) if m.bias is not None else None
    return _gemm(b, node, args[0], weight, bias)


@function_rule(norm.batch_norm)
def _batch_norm(b: _Builder, node: fx.Node, args: list) -> str:
    bn = fetch_attr(b.gm, node.args[1].target)
    c = bn.num_features
    scale = _numpy(bn.weight) if bn.weight is not None else np.ones(c, np.float32)
    shift = _numpy(bn.bias) if bn.bias is not None else np.zeros(c, np.float32)
    if bn.running_mean is None:
        raise ExportError(f"node {node.name!r}: BatchNorm without running statistics cannot be exported")
    params = [b.const(f"{node.name}_{k}", v) for k, v in
              (("scale", scale), ("shift", shift), ("mean", _numpy(bn.running_mean)), ("var", _numpy(bn.running_var)))]
    return b.add("BatchNormalization", [args[0], *params], node.name, epsilon=float(bn.eps))


def _shape_of_attr(b: _Builder, node: fx.Node) -> tuple[int, ...]:
    if node.op == "get_attr":
        return tuple(fetch_attr(b.gm, node.target).shape)
    return _shape(node)


# --- elementwise, pooling, shape ops ----------------------------------------------------------

def _unary(op: str, **attrs: Any) -> Rule:
    def rule(b: _Builder, node: fx.Node, args: list) -> str:
        return b.add(op, [args[0]], node.name, **attrs)
    return rule


module_rule(nn.ReLU)(_unary("Relu"))
function_rule(F.relu, torch.relu)(_unary("Relu"))
method_rule("relu")(_unary("Relu"))
module_rule(nn.Sigmoid)(_unary("Sigmoid"))
function_rule(torch.sigmoid, F.sigmoid)(_unary("Sigmoid"))
method_rule("sigmoid")(_unary("Sigmoid"))
module_rule(nn.Tanh)(_unary("Tanh"))
module_rule(nn.Hardswish)(_unary("HardSwish"))
function_rule(F.hardswish)(_unary("HardSwish"))
module_rule(nn.Hardsigmoid)(_unary("HardSigmoid", alpha=1.0 / 6, beta=0.5))
function_rule(F.hardsigmoid)(_unary("HardSigmoid", alpha=1.0 / 6, beta=0.5))
module_rule(nn.Identity, nn.Dropout)(_unary("Identity"))
method_rule("contiguous")(_unary("Identity"))
function_rule(operator.neg, torch.neg)(_unary("Neg"))


@module_rule(nn.GELU)
def _gelu(b: _Builder, node: fx.Node, args: list) -> str:
    return b.add("Gelu", [args[0]], node.name, approximate=b.module(node).approximate)


@module_rule(nn.SiLU)
def _silu(b: _Builder, node: fx.Node, args: list) -> str:
    return b.add("Mul", [args[0], b.add("Sigmoid", [args[0]], f"{node.name}_sigmoid")], node.name)


@module_rule(nn.PReLU)
def _prelu(b: _Builder, node: fx.Node, args: list) -> str:
    slope = _numpy(b.module(node).weight)
    rank = len(_shape(node.args[0]))
    slope = slope.reshape((-1,) + (1,) * (rank - 2)) if slope.size > 1 and rank > 2 else slope
    return b.add("PRelu", [args[0], b.const(f"{node.name}_slope", slope)], node.name)


@module_rule(nn.ReLU6)
def _relu6(b: _Builder, node: fx.Node, args: list) -> str:
    lo = b.const(f"{node.name}_min", np.array(0.0, np.float32))
    hi = b.const(f"{node.name}_max", np.array(6.0, np.float32))
    return b.add("Clip", [args[0], lo, hi], node.name)


def _binary(op: str) -> Rule:
    def rule(b: _Builder, node: fx.Node, args: list) -> str:
        operands = [a if isinstance(a, str) else b.const(f"{node.name}_const", np.array(a, np.float32))
                    for a in args[:2]]
        return b.add(op, operands, node.name)
    return rule


function_rule(operator.add, torch.add)(_binary("Add"))
method_rule("add")(_binary("Add"))
function_rule(operator.sub, torch.sub)(_binary("Sub"))
function_rule(operator.mul, torch.mul)(_binary("Mul"))
method_rule("mul")(_binary("Mul"))
function_rule(operator.truediv, torch.div)(_binary("Div"))


@function_rule(torch.cat)
def _cat(b: _Builder, node: fx.Node, args: list) -> str:
    dim = node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
    return b.add("Concat", list(args[0]), node.name, axis=int(dim))


def _global_pool_ok(node: fx.Node, output_size: Any) -> bool:
    return output_size in (1, (1, 1), [1, 1])


@module_rule(nn.AdaptiveAvgPool2d)
def _adaptive_avg(b: _Builder, node: fx.Node, args: list) -> str:
    size = b.module(node).output_size
    if not _global_pool_ok(node, size):
        raise ExportError(f"node {node.name!r}: AdaptiveAvgPool2d({size}) is exported only for output size 1")
    return b.add("GlobalAveragePool", [args[0]], node.name)


@function_rule(F.adaptive_avg_pool2d)
def _adaptive_avg_fn(b: _Builder, node: fx.Node, args: list) -> str:
    size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
    if not _global_pool_ok(node, size):
        raise ExportError(f"node {node.name!r}: adaptive_avg_pool2d({size}) is exported only for output size 1")
    return b.add("GlobalAveragePool", [args[0]], node.name)


@method_rule("mean")
def _mean(b: _Builder, node: fx.Node, args: list) -> str:
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    rank = len(_shape(node.args[0]))
    dims = list(range(rank)) if dims is None else [d % rank for d in ((dims,) if isinstance(dims, int) else dims)]
    axes = b.const(f"{node.name}_axes", np.array(dims, np.int64))
    return b.add("ReduceMean", [args[0], axes], node.name, keepdims=int(bool(keep)))


def _flatten_rule(start: int, end: int, node: fx.Node, b: _Builder, x: str) -> str:
    rank = len(_shape(node.args[0]))
    if end % rank != rank - 1:
        return _reshape_to(b, node, x)
    return b.add("Flatten", [x], node.name, axis=start % rank)


@module_rule(nn.Flatten)
def _flatten_module(b: _Builder, node: fx.Node, args: list) -> str:
    m: nn.Flatten = b.module(node)
    return _flatten_rule(m.start_dim, m.end_dim, node, b, args[0])


@function_rule(torch.flatten)
def _flatten_fn(b: _Builder, node: fx.Node, args: list) -> str:
    start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
    end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
    return _flatten_rule(start, end, node, b, args[0])


@method_rule("flatten")
def _flatten_method(b: _Builder, node: fx.Node, args: list) -> str:
    return _flatten_fn(b, node, args)


@method_rule("view", "reshape")
def _reshape(b: _Builder, node: fx.Node, args: list) -> str:
    return _reshape_to(b, node, args[0])


def _reshape_to(b: _Builder, node: fx.Node, x: str) -> str:
    shape = list(_shape(node))
    if shape and shape[0] == _shape(node.args[0])[0]:
        shape[0] = 0  # keep the (dynamic) batch dimension
    target = b.const(f"{node.name}_shape", np.array(shape, np.int64))
    return b.add("Reshape", [x, target], node.name)


def _pool_attrs(m: Any) -> dict:
    k, s, p = _two(m.kernel_size), _two(m.stride if m.stride is not None else m.kernel_size), _two(m.padding)
    return dict(kernel_shape=list(k), strides=list(s), pads=[p[0], p[1], p[0], p[1]], ceil_mode=int(m.ceil_mode))


@module_rule(nn.MaxPool2d)
def _max_pool(b: _Builder, node: fx.Node, args: list) -> str:
    m: nn.MaxPool2d = b.module(node)
    return b.add("MaxPool", [args[0]], node.name, dilations=list(_two(m.dilation)), **_pool_attrs(m))


@module_rule(nn.AvgPool2d)
def _avg_pool(b: _Builder, node: fx.Node, args: list) -> str:
    m: nn.AvgPool2d = b.module(node)
    if m.divisor_override is not None:
        raise ExportError(f"node {node.name!r}: AvgPool2d(divisor_override=...) has no ONNX equivalent")
    return b.add("AveragePool", [args[0]], node.name, count_include_pad=int(m.count_include_pad), **_pool_attrs(m))


@module_rule(nn.PixelShuffle)
def _pixel_shuffle(b: _Builder, node: fx.Node, args: list) -> str:
    return b.add("DepthToSpace", [args[0]], node.name, blocksize=int(b.module(node).upscale_factor), mode="CRD")


@function_rule(F.pixel_shuffle)
def _pixel_shuffle_fn(b: _Builder, node: fx.Node, args: list) -> str:
    return b.add("DepthToSpace", [args[0]], node.name, blocksize=int(args[1]), mode="CRD")


@function_rule(F.pad)
def _pad(b: _Builder, node: fx.Node, args: list) -> str:
    pad = list(node.args[1]) if len(node.args) > 1 else list(node.kwargs["pad"])
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0.0) or 0.0
    if mode != "constant" or not isinstance(value, (int, float)):
        raise ExportError(f"node {node.name!r}: F.pad(mode={mode!r}) with value {value!r} is not exported")
    rank = len(_shape(node.args[0]))
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):  # torch: last dim first, (begin, end) pairs
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    pads = b.const(f"{node.name}_pads", np.array(begins + ends, np.int64))
    fill = b.const(f"{node.name}_value", np.array(value, np.float32))
    return b.add("Pad", [args[0], pads, fill], node.name, mode="constant")


__all__ = ["export_qdq", "module_rule", "function_rule", "method_rule", "OPSET"]
