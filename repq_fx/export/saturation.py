"""A static check of the integer arithmetic: can a 16-bit pair sum overflow in a u8s8 kernel?

ONNX Runtime's u8s8 kernels on x86 CPUs without VNNI add two products ``a_i * w_i + a_j * w_j``
(``a`` uint8, ``w`` int8) in a 16-bit register (``VPMADDUBSW``) and saturate at 32767. Which two
products are paired depends on how the kernel packs the weights, so the check takes the
worst pair a layer can form: the largest input integer times the two largest ``|w|`` of one
output channel. A layer passes when that stays within int16. This reads only the lowered
model's integers, so it gives the same answer on every machine, VNNI or not.

>>> import torch
>>> w = torch.tensor([[[[100]], [[90]], [[1]]]], dtype=torch.int8)   # one output channel, 3 inputs
>>> worst_pair_sum(w, input_max=255)    # 255 * (100 + 90)
48450
>>> worst_pair_sum(w, input_max=127)
24130
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..quant.lowered import QuantizeDequantize, QuantizedConv2d, QuantizedLinear
from ..targets import ACTIVATION_SHIFT, INT16_MAX

_UINT8_MAX = 255


@dataclass(frozen=True)
class PairSumOverflow:
    """A layer whose worst 16-bit pair sum exceeds int16."""

    layer: str  # module path of the integer layer
    input_max: int  # the largest integer its input can take
    worst: int  # input_max * (the two largest |w| of one output channel)
    channel: int  # that output channel

    def __str__(self) -> str:
        return (f"{self.layer}: {self.input_max} * (two weights of output channel {self.channel}) reaches "
                f"{self.worst} > {INT16_MAX}")


def worst_pair_sum(weight: torch.Tensor, input_max: int) -> int:
    """``input_max`` times the largest sum of two ``|w|`` within one output channel of ``weight``."""
    return int(_pair_sums(weight, input_max).max()) if weight.numel() else 0


def _pair_sums(weight: torch.Tensor, input_max: int) -> torch.Tensor:
    flat = weight.to(torch.int64).abs().flatten(1)
    top = flat.topk(min(2, flat.shape[1]), dim=1).values.sum(1)
    return top * int(input_max)


def input_max(gm: fx.GraphModule, layer: fx.Node, stored: bool = True, signed_as_uint8: bool = False) -> int:
    """The largest magnitude of the integers the input of an integer layer can take, as its quantizer stores
    them (``quant_max`` in uint8; 128 for a grid shifted into int8) or, with ``stored=False``, on its own grid
    (``quant_max``: what x86 ONNX runtimes compute with, which run int8 activations as uint8); 255 when the
    input is not produced by a quantizer (the uint8 container's limit). ``signed_as_uint8``: a signed grid
    ``[lo, hi]`` counts as ``hi + 128``, the largest value once shifted into uint8, as OpenVINO runs it on x86."""
    x = layer.args[0]
    if isinstance(x, fx.Node) and x.op == "call_module":
        module = gm.get_submodule(x.target)
        if isinstance(module, QuantizeDequantize):
            _, lo, hi, _ = module.stored() if stored else (None, module.quant_min, module.quant_max, None)
            if signed_as_uint8 and lo < 0:
                return int(hi) + ACTIVATION_SHIFT
            return max(abs(lo), abs(hi))
    return _UINT8_MAX


def int16_pair_overflows(lowered: fx.GraphModule, stored: bool = True,
                         signed_as_uint8: bool = False) -> list[PairSumOverflow]:
    """Every integer layer of ``lowered`` whose worst pair sum exceeds int16 (empty: safe everywhere); inputs as
    stored, or on their own grids (``stored=False``), signed grids shifted into uint8 or not (see
    :func:`input_max`).

    >>> import torch.nn as nn, repq_fx
    >>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3)), repq_fx.QConfig(target="onnxruntime-vnni"))
    >>> _ = repq_fx.calibrate(q, [torch.randn(2, 3, 8, 8)])
    >>> [o.layer for o in int16_pair_overflows(repq_fx.lower(q))]
    ['quantized_conv']
    >>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3)))   # target "onnxruntime": |w| <= 64
    >>> _ = repq_fx.calibrate(q, [torch.randn(2, 3, 8, 8)])
    >>> int16_pair_overflows(repq_fx.lower(q))
    []
    """
    found = []
    for node in lowered.graph.nodes:
        if node.op != "call_module":
            continue
        module = lowered.get_submodule(node.target)
        if not isinstance(module, (QuantizedConv2d, QuantizedLinear)) or not module.weight.numel():
            continue
        a_max = input_max(lowered, node, stored, signed_as_uint8)
        sums = _pair_sums(module.weight, a_max)
        channel = int(sums.argmax())
        if int(sums[channel]) > INT16_MAX:
            found.append(PairSumOverflow(node.target, a_max, int(sums[channel]), channel))
    return found


__all__ = ["PairSumOverflow", "worst_pair_sum", "input_max", "int16_pair_overflows"]
