"""QDQ ONNX from a lowered GraphModule, through ``torch.onnx.export(dynamo=True)``.

Traced, a lowered model is PyTorch's quantized reference representation
(:mod:`repq_fx.quant.lowered`): ``quantized_decomposed`` quantize/dequantize ops around float
ops. ``torch.onnx`` exports that form, and every other op it knows, so the exported file holds
whatever the model does (pooling, reshapes, permutes, upsampling, BatchNorms left in float, dict
outputs, several inputs), and each quantized layer comes out in the standard QDQ form that ONNX
Runtime fuses into integer kernels:

- activation quantizers -> ``QuantizeLinear`` -> ``DequantizeLinear`` (per tensor);
- ``QuantizedConv2d`` -> ``DequantizeLinear`` of the int8 (or uint8) weight, per channel on axis 0,
  and of the int32 bias (scale ``s_x * s_w``) -> ``Conv``; ``QuantizedLinear`` -> ``Gemm``.

One translation is ours: torch.onnx's ``quantize_per_tensor`` ignores ``quant_min``/``quant_max``,
so a grid narrower than its 8-bit container (4-bit activations) would saturate at 0..255 instead of
0..15. :func:`_quantize_per_tensor` adds the integer ``Clip`` that keeps it on the trained grid (and
keeps the ``QuantizeLinear`` fusable).

The file records, in its metadata (:data:`TENSOR_NAMES`), which ONNX tensors enter and leave each
activation quantizer, so :mod:`repq_fx.export.parity` can run it layer by layer.

>>> import torch, torch.nn as nn, repq_fx, tempfile, os, onnx
>>> qmodel = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
>>> _ = repq_fx.calibrate(qmodel, [torch.randn(2, 3, 8, 8)])
>>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
>>> model = export_qdq(repq_fx.lower(qmodel), (torch.randn(1, 3, 8, 8),), path)
>>> sorted({n.op_type for n in model.graph.node})
['Conv', 'DequantizeLinear', 'QuantizeLinear', 'Relu']
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from ..capture.example_inputs import batched_example
from ..errors import ExportError, SaturationError, first_few
from ..ir import RuleTable
from ..quant.lowered import QuantizeDequantize, QuantizedConv2d, QuantizedLinear
from ..targets import DEFAULT_TARGET, Target, get_target
from .saturation import int16_pair_overflows

TENSOR_NAMES = "repq_fx.tensor_names"  # metadata key: JSON {"quantizers": {path: [in, out]}, "inputs": {...}}


def export_qdq(lowered: fx.GraphModule, example_inputs: Sequence[Any], path: str | None = None,
               input_names: Sequence[str] | None = None, target: str | None = None) -> onnx.ModelProto:
    """The QDQ ONNX model of ``lowered`` (checked with ``onnx.checker``); saved to ``path`` if given.

    ``target`` (a name in :data:`repq_fx.targets.TARGETS`; default: the one the model was prepared
    for) sets how weights are stored. A weight grid the target's kernels cannot compute exactly is
    refused (:class:`~repq_fx.errors.SaturationError`, naming the layers) or, for a target that is
    exact only on some CPUs, exported with a warning that says which. The batch dimension of every
    input is dynamic unless the model's forward fixes it (then a warning says so).
    """
    if not isinstance(lowered, fx.GraphModule) or not any(
            isinstance(m, (QuantizeDequantize, QuantizedConv2d, QuantizedLinear)) for m in lowered.modules()):
        raise ExportError(f"export_onnx() needs the GraphModule returned by repq_fx.lower; got "
                          f"{type(lowered).__name__}")
    scheme = get_target(target or getattr(lowered, "repq_target", DEFAULT_TARGET))
    model = with_containers(lowered, scheme.weight_container, scheme.activation_container).eval()
    _check_pair_sums(model, scheme)
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    placeholders = [n.name for n in lowered.graph.nodes if n.op == "placeholder"]
    names = list(input_names or (["input"] if len(placeholders) == 1 else placeholders))
    with torch.no_grad():
        outputs, _ = tree_flatten(model(*example))
    output_names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    program = _torch_onnx_export(model, example, names, output_names)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {TENSOR_NAMES: json.dumps(_tensor_names(lowered, proto, names))})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"torch.onnx wrote a model that onnx.checker rejects: {str(e).splitlines()[0]}") from e
    if path is not None:
        onnx.save(proto, path)
    return proto


def with_containers(lowered: fx.GraphModule, weights: str, activations: str = "uint8") -> fx.GraphModule:
    """``lowered``, or a copy of it whose traced form stores weights and activations in these 8-bit types (a
    target's ``weight_container`` and ``activation_container``); the integers and the eager arithmetic stay.

    >>> import torch.nn as nn, repq_fx
    >>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3)))
    >>> _ = repq_fx.calibrate(q, [torch.randn(2, 3, 8, 8)])
    >>> m = with_containers(repq_fx.lower(q), "int8", "int8")
    >>> m.input_fake_quant.container
    torch.int8
    """
    layers = [m for m in lowered.modules() if isinstance(m, (QuantizedConv2d, QuantizedLinear))]
    quantizers = [m for m in lowered.modules() if isinstance(m, QuantizeDequantize)]
    if all(m.weight_container == weights for m in layers) and all(m.storage == activations for m in quantizers):
        return lowered
    model = copy.deepcopy(lowered)
    for m in model.modules():
        if isinstance(m, (QuantizedConv2d, QuantizedLinear)):
            m.set_weight_container(weights)
        elif isinstance(m, QuantizeDequantize):
            m.set_container(activations)
    return model


def _torch_onnx_export(model: fx.GraphModule, example: tuple, names: list[str], output_names: list[str]):
    batch = torch.export.Dim("N", min=1)
    dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() else None for x in example)
    attempts = [(batched_example(example), dynamic), (example, None)]
    error: Exception | None = None
    for args, shapes in attempts:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=shapes, input_names=names,
                                            output_names=output_names, verbose=False, report=False,
                                            custom_translation_table=TRANSLATIONS.functions(), external_data=False)
        except Exception as e:  # noqa: BLE001 - torch.onnx raises many kinds; all are reported below
            error = e
            continue
        if shapes is None and dynamic is not None and any(s is not None for s in dynamic):
            warnings.warn("the model's forward fixes its batch size, so the ONNX file has a fixed batch of "
                          f"{example[0].shape[0]} (torch.export: {_first_line(error)})", RuntimeWarning, stacklevel=4)
        return program
    raise ExportError(f"torch.onnx could not export the lowered model: {_first_line(error)}. Ops torch.onnx does "
                      "not know can be left out of the model, or given a translation with "
                      "torch.onnx.export(custom_translation_table=...)") from error


def _first_line(error: Exception | None) -> str:
    text = str(error or "").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("-", "#", "["))]
    summary = next((line for line in lines if "Error" in line or "error" in line), lines[0] if lines else "")
    return f"{type(error).__name__}: {summary[:400]}"


def _tensor_names(lowered: fx.GraphModule, proto: onnx.ModelProto, input_names: list[str]) -> dict:
    """``{"quantizers": {module path: [ONNX tensor into its QuantizeLinear, out of its DequantizeLinear]},
    "inputs": {FX placeholder: ONNX input}}``, read from the scopes torch.onnx records on each node."""
    paths = {n.target for n in lowered.graph.nodes if n.op == "call_module"
             and isinstance(lowered.get_submodule(n.target), QuantizeDequantize)}
    found: dict[str, list[str | None]] = {p: [None, None] for p in sorted(paths)}  # sorted: reproducible files
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scopes = next((json.loads(p.value.replace("'", '"')) for p in node.metadata_props
                       if p.key == "pkg.torch.onnx.name_scopes"), [])
        owner = next((s for s in reversed(scopes) if s in found), None)
        if owner is None:
            continue
        if node.op_type == "QuantizeLinear":
            found[owner][0] = node.input[0]
        else:
            found[owner][1] = node.output[0]
    placeholders = [n.name for n in lowered.graph.nodes if n.op == "placeholder"]
    return {"quantizers": {p: v for p, v in found.items() if None not in v},
            "inputs": dict(zip(placeholders, input_names))}


def _check_pair_sums(lowered: fx.GraphModule, scheme: Target) -> None:
    """Refuse (or, for a VNNI-only target, warn about) int8 weights whose 16-bit pair sums can overflow."""
    if scheme.weight_container != "int8":
        return  # u8u8 kernels multiply in 16 bits and accumulate in 32: no pair sums to saturate
    # ONNX Runtime and OpenVINO run int8 activations as uint8 on x86 (measured: OpenVINO's convs of an int8-activation
    # file run in u8): the pairs to check are those of the uint8 grid, whatever the file stores
    overflows = int16_pair_overflows(lowered, stored=False)
    if not overflows:
        return
    listed = first_few(overflows)
    if scheme.int16_pair_sums:
        raise SaturationError(
            f"{len(overflows)} int8 layers can overflow the 16-bit pair sums of ONNX Runtime's u8s8 kernels on x86 "
            f"CPUs without VNNI ({listed}), so target {scheme.name!r} would run them wrong there. Prepare the model "
            "with QConfig(target='onnxruntime') to train the narrower grid, or export these weights with "
            "target='onnxruntime-u8u8' (exact on every CPU, slower) or 'onnxruntime-vnni' (exact only on VNNI CPUs)")
    warnings.warn(f"target {scheme.name!r}: {len(overflows)} int8 layers are exact only on {scheme.exact_on} "
                  f"({listed})", RuntimeWarning, stacklevel=3)


# --- the one translation torch.onnx gets wrong ---------------------------------------------------

TRANSLATIONS: RuleTable[Callable[..., Any]] = RuleTable("ONNX translation")  # op -> onnxscript function


@TRANSLATIONS.register(torch.ops.quantized_decomposed.quantize_per_tensor.default)
def _quantize_per_tensor(input: Any, scale: float, zero_point: int, quant_min: int, quant_max: int,
                         dtype: int) -> Any:
    """``QuantizeLinear``, then an integer ``Clip`` to ``[quant_min, quant_max]`` where the grid is narrower
    than the 8-bit container (torch.onnx's own translation drops the range)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    np_dtype = ir.DataType(dtype).numpy()
    zero = op.Constant(value=ir.tensor(np.array(zero_point, dtype=np_dtype)))
    q = op.QuantizeLinear(input, op.Constant(value=ir.tensor(np.array(scale, dtype=np.float32))), zero)
    info = np.iinfo(np_dtype)
    if (quant_min, quant_max) != (info.min, info.max):
        lo = op.Constant(value=ir.tensor(np.array(quant_min, dtype=np_dtype)))
        hi = op.Constant(value=ir.tensor(np.array(quant_max, dtype=np_dtype)))
        q = op.Clip(q, lo, hi)
    return q


__all__ = ["export_qdq", "batched_example", "with_containers", "TENSOR_NAMES", "TRANSLATIONS"]
