"""ExecuTorch ``.pte`` files whose int8 convs run in XNNPACK, from a lowered model.

XNNPACK's delegate (executorch/backends/xnnpack) takes the pattern PT2E's convert writes with its
own quantizer: ``dequantize_per_tensor`` (int8 activation, any zero point) -> conv/linear with a
``dequantize_per_channel`` int8 weight (zero point 0) and a *float* bias -> optional ReLU ->
``quantize_per_tensor`` (int8). Its serializer stores every per-tensor quantized tensor as
``qint8`` and requantizes the float bias to int32 at scale ``s_x * s_w`` itself. So
:func:`xnnpack_form` traces the lowered model with

- activations in int8: the trained uint8 grid with zero point ``z`` is the same grid as int8 with
  zero point ``z - 128`` (``Target.activation_container``);
- weights in int8 (zero point 0); ``QConfig(target="xnnpack")`` trains ``|w| <= 127``, which ARM's
  NEON kernels need (two int8 x int8 products summed in 16 bits); x86 kernels sum pairs in 32 bits;
- the bias as the float constant ``b * s_x * s_w``, checked here to quantize back to exactly ``b``.

:func:`export_pte` lowers that to XNNPACK (``to_edge_transform_and_lower``), counts what was
delegated (``get_delegation_info``: every conv must be), writes the ``.pte`` and, with
``check=True``, runs it in ExecuTorch's runtime against the lowered model.

>>> import os, tempfile, torch, torch.nn as nn, repq_fx
>>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), repq_fx.QConfig(target="xnnpack"))
>>> _ = repq_fx.calibrate(q, [torch.randn(4, 3, 8, 8)])
>>> result = export_pte(repq_fx.lower(q), (torch.randn(1, 3, 8, 8),), os.path.join(tempfile.mkdtemp(), "m.pte"))
>>> result.delegation.delegated_convs, result.delegation.non_delegated_convs, result.within_one_step
(1, 0, 1.0)
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from ..errors import ExportCheckError, ExportError
from ..quant.lowered import QuantizeDequantize, QuantizedConv2d, QuantizedLinear
from .parity import AGREEMENT, step_agreement
from .saturation import int16_pair_overflows

_INT32 = torch.iinfo(torch.int32)
_CONV = "aten_convolution_default"
_LINEAR = ("aten_linear_default", "aten_addmm_default", "aten_mm_default")


@dataclass(frozen=True)
class Delegation:
    """What XNNPACK took over in the exported program (``get_delegation_info``)."""

    quantized_convs: int  # QuantizedConv2d modules in the lowered model
    delegated_convs: int
    non_delegated_convs: int
    delegated_linears: int
    non_delegated_linears: int
    subgraphs: int  # XNNPACK subgraphs (call_delegate nodes)
    non_delegated_ops: tuple[str, ...]  # op types left to ExecuTorch's portable kernels

    @property
    def all_convs_delegated(self) -> bool:
        return self.non_delegated_convs == 0 and self.delegated_convs >= self.quantized_convs

    def __str__(self) -> str:
        left = ", ".join(self.non_delegated_ops) or "nothing"
        return (f"XNNPACK runs {self.delegated_convs} of {self.delegated_convs + self.non_delegated_convs} convs "
                f"({self.quantized_convs} int8) and {self.delegated_linears} of "
                f"{self.delegated_linears + self.non_delegated_linears} linears in {self.subgraphs} subgraphs; "
                f"left out: {left}")


@dataclass(frozen=True)
class PteExport:
    """A written ``.pte`` file, what XNNPACK runs of it and (``check=True``) how it agrees with the lowered model."""

    path: str
    delegation: Delegation
    within_one_step: float | None = None  # fraction of outputs within one output step of the lowered model
    max_steps: float | None = None

    def __str__(self) -> str:
        parity = ("" if self.within_one_step is None else
                  f"; {100 * self.within_one_step:.2f} % of outputs within one step (max {self.max_steps:.1f})")
        return f"{self.path}: {self.delegation}{parity}"


def xnnpack_form(lowered: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``lowered`` whose traced form is XNNPACK's quantized pattern (module docstring); refuses
    (:class:`~repq_fx.errors.ExportError`) grids XNNPACK cannot hold and warns where ARM kernels could overflow.

    >>> import torch.nn as nn, repq_fx
    >>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3)), repq_fx.QConfig(act_bits=4, first_last_bits=None))
    >>> _ = repq_fx.calibrate(q, [torch.randn(2, 3, 8, 8)])
    >>> xnnpack_form(repq_fx.lower(q))
    Traceback (most recent call last):
    ...
    repq_fx.errors.ExportError: XNNPACK's int8 tensors hold the full 8-bit range, but 2 activation quantizers have narrower grids (first: 'output_fake_quant', [0, 15]); prepare the model with act_bits=8 and first_last_bits=8 for an XNNPACK .pte
    """
    if not isinstance(lowered, fx.GraphModule) or not any(
            isinstance(m, (QuantizedConv2d, QuantizedLinear)) for m in lowered.modules()):
        raise ExportError(f"export_pte() needs the GraphModule returned by repq_fx.lower; got {type(lowered).__name__}")
    narrow = [(n, m) for n, m in lowered.named_modules()
              if isinstance(m, QuantizeDequantize) and m.quant_max - m.quant_min != 255]
    if narrow:
        name, m = narrow[0]
        raise ExportError(f"XNNPACK's int8 tensors hold the full 8-bit range, but {len(narrow)} activation quantizers "
                          f"have narrower grids (first: {name!r}, [{m.quant_min}, {m.quant_max}]); prepare the model "
                          "with act_bits=8 and first_last_bits=8 for an XNNPACK .pte")
    model = copy.deepcopy(lowered).eval()
    for name, m in model.named_modules():
        if isinstance(m, QuantizeDequantize):
            m.set_container("int8")
        elif isinstance(m, (QuantizedConv2d, QuantizedLinear)):
            m.set_weight_container("int8")
            m.set_float_bias()
            _check_bias_round_trip(name, m)
    overflows = int16_pair_overflows(model)
    if overflows:
        warnings.warn(f"{len(overflows)} int8 layers have weights of -128 that XNNPACK's ARM NEON kernels can overflow "
                      f"in 16-bit pair sums (first: {overflows[0]}); exact on x86. Prepare the model with "
                      "QConfig(target='xnnpack') to train |w| <= 127", RuntimeWarning, stacklevel=3)
    return model


def _check_bias_round_trip(name: str, layer: QuantizedConv2d | QuantizedLinear) -> None:
    """XNNPACK quantizes the float bias back to int32 at scale ``s_x * s_w``: it must give the trained integers."""
    if layer.bias is None:
        return
    back = torch.ops.quantized_decomposed.quantize_per_channel.default(
        layer._float_bias, layer._bias_scale, torch.zeros_like(layer._bias_scale, dtype=torch.int64), 0,
        _INT32.min, _INT32.max, torch.int32)
    if not torch.equal(back, layer.bias):
        bad = int((back != layer.bias).sum())
        raise ExportError(f"layer {name!r}: {bad} int32 biases do not survive XNNPACK's float bias (b * s_x * s_w, "
                          "quantized back at s_x * s_w); this is a bug in repq_fx's export: please report it")


def _export(model: nn.Module, example: tuple, partition: bool = True):
    """``torch.export`` -> ``to_edge_transform_and_lower`` with XNNPACK's partitioner: the edge program manager."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.export.export(model, example)
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()] if partition else None)


def delegation(edge, quantized_convs: int) -> Delegation:
    """Count what XNNPACK delegated in ``edge`` (an ExecuTorch edge program manager)."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge.exported_program().graph_module)
    ops = info.delegation_by_operator
    conv = ops.get(_CONV)
    linears = [ops[k] for k in _LINEAR if k in ops]
    left = tuple(sorted(k for k, v in ops.items() if v.non_delegated and k != "getitem"))
    return Delegation(quantized_convs, conv.delegated if conv else 0, conv.non_delegated if conv else 0,
                      sum(v.delegated for v in linears), sum(v.non_delegated for v in linears),
                      info.num_delegated_subgraphs, left)


def export_pte(lowered: fx.GraphModule, example_inputs: Sequence[Any], path: str, check: bool = True,
               check_inputs: Sequence[Any] | None = None, threads: int = 1) -> PteExport:
    """Write ``lowered`` as an ExecuTorch ``.pte`` at ``path`` with its convs delegated to XNNPACK (int8).

    The input shapes are those of ``example_inputs`` (static). Raises :class:`~repq_fx.errors.ExportError` when a
    conv is left out of XNNPACK, and with ``check`` runs the file in ExecuTorch's runtime on ``check_inputs``
    (default: ``example_inputs``) against the lowered model: :class:`~repq_fx.errors.ExportCheckError` when fewer
    than 99.9 % of the outputs are within one output step.
    """
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    model = xnnpack_form(lowered)
    quantized = sum(isinstance(m, QuantizedConv2d) for m in model.modules())
    edge = _export(model, example)
    found = delegation(edge, quantized)
    if not found.all_convs_delegated:
        raise ExportError(f"XNNPACK left {found.non_delegated_convs} convs out of its delegate ({found}); run with "
                          "logging at DEBUG for executorch.backends.xnnpack's reasons")
    _write(edge, path)
    result = PteExport(path, found)
    if not check:
        return result
    inputs = tuple(check_inputs) if check_inputs is not None else example
    within, worst, _ = step_agreement(run_pte(load_pte(path, threads), inputs), lowered, inputs)
    result = PteExport(path, found, within, worst)
    if within < AGREEMENT:
        raise ExportCheckError(f"ExecuTorch/XNNPACK disagrees with the lowered model: {result}")
    return result


def export_float_pte(model: nn.Module, example_inputs: Sequence[Any], path: str) -> Delegation:
    """A float ``.pte`` of ``model`` (e.g. ``repq_fx.merge(model)``) with XNNPACK's fp32 kernels: the float
    counterpart of :func:`export_pte` for latency comparisons."""
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    edge = _export(copy.deepcopy(model).eval(), example)
    _write(edge, path)
    return delegation(edge, 0)


def _write(edge, path: str) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = edge.to_executorch()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(program.buffer)


def load_pte(path: str, threads: int = 1):
    """The ``forward`` method of a ``.pte`` in ExecuTorch's Python runtime, XNNPACK's thread pool at ``threads``."""
    from executorch.runtime import Runtime

    try:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
    except (ImportError, RuntimeError):  # older runtimes: their default pool
        pass
    return Runtime.get().load_program(path).load_method("forward")


def run_pte(method, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The flattened outputs of a loaded ``.pte`` method on ``inputs``."""
    return list(tree_leaves(method.execute(tuple(inputs))))


__all__ = ["Delegation", "PteExport", "xnnpack_form", "delegation", "export_pte", "export_float_pte", "load_pte",
           "run_pte"]
