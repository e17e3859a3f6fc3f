"""OpenVINO (CPU) on the QDQ ONNX of :func:`repq_fx.export_onnx`: int8 execution, parity, IR files.

OpenVINO reads the QDQ file directly (``Core.read_model``); its low-precision transformations turn
each ``QuantizeLinear -> DequantizeLinear`` pair into a ``FakeQuantize`` and each quantized conv or
gemm into an integer primitive (oneDNN), which the compiled model's runtime graph reports per op
(``runtimePrecision``: ``u8``/``i8`` for an int8 kernel, ``f32`` for a float fallback).
:func:`runtime_precisions` counts them; :func:`check_openvino` runs the file layer by layer on the
lowered model's own values (the same cut as :func:`~repq_fx.export.parity.segment_parity` for ONNX
Runtime) and end to end, and raises when a layer is more than one step off.

oneDNN's u8s8 kernels on x86 without VNNI add pairs of products in 16 bits (``vpmaddubsw``) like
ONNX Runtime's, so a grid that ONNX Runtime computes exactly (the ``"onnxruntime"`` target, ``|w| <=
64`` behind 8-bit inputs) is also exact in OpenVINO there; float inference precision is pinned to
f32 (``INFERENCE_PRECISION_HINT``) so that CPUs with bf16 do not round the float parts differently.

>>> import os, tempfile, torch, torch.nn as nn, repq_fx
>>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)))
>>> _ = repq_fx.calibrate(q, [torch.randn(4, 3, 12, 12)])
>>> lowered, path = repq_fx.lower(q), os.path.join(tempfile.mkdtemp(), "m.onnx")
>>> _ = repq_fx.export_onnx(lowered, (torch.randn(1, 3, 12, 12),), path)
>>> result = check_openvino(path, lowered, (torch.randn(4, 3, 12, 12),))
>>> result.int8_convs, result.float_convs, result.within_one_step >= 0.999
(2, 0, True)
"""
from __future__ import annotations

import collections
import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from ..errors import ExportCheckError, ExportError, first_few
from .parity import AGREEMENT, cpu_int8_features, output_steps, segment_parity, step_agreement, steps_apart

INT8 = ("u8", "i8")  # runtime precisions of an integer kernel
_LAYERS = ("Convolution", "FullyConnected", "MatMul", "GroupConvolution")


def compile_model(model: str | bytes, threads: int = 1, device: str = "CPU"):
    """An OpenVINO compiled model of an ONNX/IR file (or serialized ONNX bytes), ``threads`` inference threads,
    latency mode, f32 as the float inference precision (no bf16 on CPUs that have it)."""
    import openvino as ov

    core = ov.Core()
    source = core.read_model(io.BytesIO(model)) if isinstance(model, (bytes, bytearray)) else core.read_model(model)
    return core.compile_model(source, device, {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                               "INFERENCE_PRECISION_HINT": "f32"})


def runtime_precisions(compiled) -> collections.Counter:
    """``Counter((layer type, runtime precision))`` over the ops of the graph OpenVINO executes."""
    counts: collections.Counter = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        counts[(kind, precision)] += 1
    return counts


def run(compiled, inputs: Sequence[Any]) -> list[np.ndarray]:
    """The outputs of a compiled model on ``inputs`` (tensors or arrays), in order."""
    request = compiled.create_infer_request()
    feed = {i: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
            for i, x in enumerate(inputs)}
    results = request.infer(feed)
    return [np.asarray(results[o]) for o in compiled.outputs]


@dataclass(frozen=True)
class OpenVINOParity:
    """OpenVINO's int8 execution of a QDQ file and its agreement with the lowered model."""

    int8_convs: int  # Convolution primitives with an integer runtime precision
    float_convs: int  # Convolution primitives in f32 (not int8)
    int8_gemms: int  # FullyConnected / MatMul in int8
    within_one_step: float  # end to end, fraction of outputs within one output step
    max_steps: float
    layers: int = 0  # quantizer stretches checked one by one (check_openvino)
    worst_layer_within: float = 1.0

    def __str__(self) -> str:
        layers = (f"; {self.layers} layers one by one, worst {100 * self.worst_layer_within:.2f} % within one step"
                  if self.layers else "")
        return (f"OpenVINO runs {self.int8_convs} convs in int8, {self.float_convs} in f32, {self.int8_gemms} int8 "
                f"gemms; {100 * self.within_one_step:.2f} % of outputs within one step (max {self.max_steps:.1f})"
                f"{layers}")


def openvino_parity(path: str, lowered: fx.GraphModule, inputs: Sequence[torch.Tensor],
                    threads: int = 1) -> OpenVINOParity:
    """Run ``path`` in OpenVINO (CPU) on ``inputs``: int8 primitives counted, outputs against ``lowered``."""
    compiled = compile_model(path, threads)
    counts = runtime_precisions(compiled)
    convs = {p: n for (k, p), n in counts.items() if k in ("Convolution", "GroupConvolution")}
    gemms = sum(n for (k, p), n in counts.items() if k in ("FullyConnected", "MatMul") and p in INT8)
    within, worst, _ = step_agreement(run(compiled, tuple(inputs)), lowered, tuple(inputs))
    return OpenVINOParity(sum(n for p, n in convs.items() if p in INT8),
                          sum(n for p, n in convs.items() if p not in INT8), gemms, within, worst)


def _run_segment(threads: int):
    def run_bytes(model: bytes, feed: dict) -> np.ndarray:
        compiled = compile_model(model, threads)
        request = compiled.create_infer_request()
        names = [i.get_any_name() for i in compiled.inputs]
        results = request.infer({i: feed[name] for i, name in enumerate(names)})
        return np.asarray(results[compiled.outputs[0]])

    return run_bytes


def check_openvino(path: str, lowered: fx.GraphModule, inputs: Sequence[torch.Tensor],
                   threads: int = 1, deployed: str | None = None) -> OpenVINOParity:
    """OpenVINO against ``lowered``: every quantizer's stretch of the QDQ ONNX file ``path`` alone on the lowered
    model's values, then end to end the file ``deployed`` (an IR ``.xml`` converted from ``path``; default:
    ``path`` itself). Raises :class:`~repq_fx.errors.ExportCheckError` when a layer has fewer than 99.9 % of its outputs
    within one step (or an integer layer any value further), or when no conv runs in int8."""
    inputs = tuple(inputs)
    layers = [s for s in segment_parity(path, lowered, inputs, threads, run=_run_segment(threads))]
    if deployed is not None:
        _require_same_outputs(path, deployed, lowered, inputs, threads)
    result = openvino_parity(deployed or path, lowered, inputs, threads)
    result = OpenVINOParity(result.int8_convs, result.float_convs, result.int8_gemms, result.within_one_step,
                            result.max_steps, len(layers), min((s.within_one_step for s in layers), default=1.0))
    bad = [s for s in layers if not s.ok]
    if bad:
        listed = first_few(bad)
        raise ExportCheckError(f"OpenVINO disagrees with the lowered model in {len(bad)} layers ({listed}); {result}. "
                               f"This machine is {cpu_int8_features()}")
    if result.int8_convs == 0 and result.float_convs:
        raise ExportCheckError(f"OpenVINO runs no conv in int8: {result}")
    return result


def _require_same_outputs(path: str, deployed: str, lowered: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
                          threads: int) -> None:
    """The deployed file runs as the checked ONNX file does in OpenVINO (within one output step): it is that
    model, not another one (a stale file, another checkpoint's)."""
    within, worst, compared = steps_apart(run(compile_model(deployed, threads), inputs),
                                          run(compile_model(path, threads), inputs), output_steps(lowered))
    if compared and within < 1.0:
        raise ExportCheckError(f"{deployed} is not the model that was checked: in OpenVINO its outputs differ from "
                               f"the lowered model's QDQ ONNX by up to {worst:.1f} output steps; write it again "
                               "from this model")


def require_exact_in_openvino(lowered: fx.GraphModule, target: str | None = None) -> None:
    """Refuse a model whose signed activations OpenVINO would compute wrong on x86 CPUs without VNNI.

    OpenVINO's CPU plugin runs an int8 activation as uint8, shifted by 128 (measured), so a signed grid
    (the ``tensorrt`` target's) reaches 255 at the input of oneDNN's u8s8 kernels, whose 16-bit pair sums
    then overflow with weights the target allows. Unsigned grids are the same in every x86 runtime and are
    judged by the ONNX export's own check (:func:`repq_fx.export.onnx_qdq.export_qdq`).
    """
    from ..errors import SaturationError
    from ..targets import DEFAULT_TARGET, get_target
    from .saturation import int16_pair_overflows

    scheme = get_target(target or getattr(lowered, "repq_target", DEFAULT_TARGET))
    if not scheme.symmetric_activations:
        return
    overflows = int16_pair_overflows(lowered, stored=False, signed_as_uint8=True)
    if overflows:
        listed = first_few(overflows)
        raise SaturationError(
            f"target {scheme.name!r} trains signed activations, which OpenVINO runs as uint8 (shifted by 128) on "
            f"x86; then {len(overflows)} int8 layers can overflow the 16-bit pair sums of its u8s8 kernels on CPUs "
            f"without VNNI ({listed}). Write this model as .onnx for {scheme.exact_on.split(';')[0]}; for OpenVINO, "
            "prepare it with QConfig(target='onnxruntime'), whose grid OpenVINO computes exactly on every CPU")


def save_ir(onnx_path: str, xml_path: str) -> str:
    """OpenVINO IR (``.xml`` + ``.bin``) of a QDQ ONNX file, weights kept as they are (no fp16 compression).

    >>> save_ir("missing.onnx", "m.xml")
    Traceback (most recent call last):
    ...
    repq_fx.errors.ExportError: OpenVINO could not read 'missing.onnx' (file not found); export it first with repq_fx.export_onnx
    """
    import os

    import openvino as ov

    if not os.path.exists(onnx_path):
        raise ExportError(f"OpenVINO could not read {onnx_path!r} (file not found); export it first with "
                          "repq_fx.export_onnx")
    ov.save_model(ov.Core().read_model(onnx_path), xml_path, compress_to_fp16=False)
    return xml_path


__all__ = ["INT8", "OpenVINOParity", "compile_model", "runtime_precisions", "run", "openvino_parity",
           "check_openvino", "require_exact_in_openvino", "save_ir"]
