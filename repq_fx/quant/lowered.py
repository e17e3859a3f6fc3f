"""The deploy-time modules ``lower`` puts in the graph: fixed quant-dequant, integer conv and linear.

Run eagerly, a lowered block computes what ONNX Runtime's ``QLinearConv`` computes: the input on
the activation grid, ``acc = sum (x_q - z_x) * w_q + b_q`` in exact integer arithmetic (int8
weights, int32 bias at scale ``s_x * s_w``), and ``acc * s_x * s_w`` as the float output,
which the next :class:`QuantizeDequantize` puts on the output grid. Integers are accumulated
in float32 where the layer's worst case stays below 2**24 (exact), else in float64.

Traced (``torch.export``, ``torch.onnx.export(dynamo=True)``, ``torch.compile``), the same modules
are PyTorch's quantized reference representation, the form PT2E's convert produces:
``quantized_decomposed`` quantize/dequantize ops around float ``conv2d``/``linear``, with the
weights and the int32 bias as integer constants behind ``dequantize_per_channel``. Exporters and
compilers pattern-match exactly that form (ONNX Runtime fuses it into ``QLinearConv``). The two
forms hold the same integers; their float outputs differ only by rounding.

>>> import torch
>>> qdq = QuantizeDequantize(scale=0.5, zero_point=0, quant_min=0, quant_max=255)
>>> qdq(torch.tensor([0.2, 0.3, 1.0, -1.0, 200.0]))
tensor([  0.0000,   0.5000,   1.0000,   0.0000, 127.5000])
>>> conv = QuantizedConv2d(torch.tensor([[[[2]]]], dtype=torch.int8), torch.tensor([0.25]),
...                        torch.tensor([4], dtype=torch.int32), input_scale=0.5)
>>> conv(torch.tensor([[[[1.5]]]]))   # (3 * 2 + 4) * 0.5 * 0.25
tensor([[[[1.2500]]]])
"""
from __future__ import annotations

from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn as nn
import torch.nn.functional as F

from ..algebra.affine import pair
from ..errors import ConfigError

_FLOAT32_EXACT = 2 ** 24
_INT32 = torch.iinfo(torch.int32)
_qd = torch.ops.quantized_decomposed  # registered by the import of torch.ao...._decomposed below


def tracing() -> bool:
    """True while torch.export or torch.compile traces: the modules then emit the reference representation."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


class QuantizeDequantize(nn.Module):
    """Per-tensor fake quant with fixed parameters: ``(clamp(round(x / s) + z) - z) * s``.

    Rounds in float32 as the training-time quantizer did, whatever ``x``'s dtype.
    """

    explicit_range = False  # traced form: clamp a narrow grid after the quantize (see reference())

    def __init__(self, scale: float | torch.Tensor, zero_point: int | torch.Tensor, quant_min: int,
                 quant_max: int, container: str | None = None) -> None:
        super().__init__()
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)
        self.storage = container  # the 8-bit type of the traced form ("uint8"/"int8"); None: the grid's own
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(1).clone())
        self.register_buffer("zero_point", torch.as_tensor(zero_point).round().to(torch.int32).reshape(1).clone())
        self._constants()

    def _constants(self) -> None:
        # Python numbers for the traced form: literals in the graph, as PT2E writes them
        self._scale_value, self._zero_point_value = float(self.scale), int(self.zero_point)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._constants()

    @property
    def container(self) -> torch.dtype:
        """The 8-bit integer type that holds the grid in the traced form: :attr:`storage` if set, else uint8, or
        int8 for a grid with negative values."""
        if self.storage is not None:
            return torch.int8 if self.storage == "int8" else torch.uint8
        return torch.int8 if self.quant_min < 0 else torch.uint8

    def set_container(self, container: str | None) -> None:
        """Store the grid as ``"int8"`` or ``"uint8"`` in the traced form (None: its own type). A uint8 grid
        moves into int8 as ``q - 128`` with zero point ``z - 128`` (XNNPACK): the same grid, the same values.

        >>> qdq = QuantizeDequantize(scale=0.5, zero_point=3, quant_min=0, quant_max=255)
        >>> qdq.set_container("int8"); qdq.stored()
        (-125, -128, 127, torch.int8)
        """
        if container not in (None, "int8", "uint8"):
            raise ConfigError(f"container must be 'int8', 'uint8' or None; got {container!r}")
        self.storage = container

    def stored(self) -> tuple[int, int, int, torch.dtype]:
        """``(zero point, quant_min, quant_max, dtype)`` of the traced form: the grid shifted into :attr:`container`."""
        dtype = self.container
        natural = torch.int8 if self.quant_min < 0 else torch.uint8
        shift = 0 if dtype == natural else (-128 if dtype == torch.int8 else 128)
        lo, hi = self.quant_min + shift, self.quant_max + shift
        info = torch.iinfo(dtype)
        if lo < info.min or hi > info.max:
            raise ConfigError(f"the grid [{self.quant_min}, {self.quant_max}] does not fit {dtype} shifted by {shift}; "
                              "an 8-bit container holds 256 levels, a grid of at most 8 bits (QConfig bits 2..8)")
        return self._zero_point_value + shift, lo, hi, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tracing():
            return self.reference(x)
        y = torch.fake_quantize_per_tensor_affine(x.float(), self.scale, self.zero_point,
                                                  self.quant_min, self.quant_max)
        return y.to(x.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """``dequantize_per_tensor(quantize_per_tensor(x))``: the same values, as reference-representation ops.

        With :attr:`explicit_range` set and a grid narrower than its 8-bit container (4-bit activations), an
        integer ``clamp`` to ``[quant_min, quant_max]`` follows the quantize: inductor's x86 passes fuse
        ``conv -> quantize`` into one int8 conv that saturates at the container's limits only (they drop the
        quantize's range), and the clamp keeps the trained grid. Off by default: the ONNX exporter adds its own.
        """
        args = (self._scale_value, *self.stored())
        q = _qd.quantize_per_tensor.default(_as(x, torch.float32), *args)
        if self.explicit_range:
            q = self._clamp_to_grid(q, *args[2:4])
        return _as(_qd.dequantize_per_tensor.default(q, *args), x.dtype)

    def _clamp_to_grid(self, q: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``q`` clamped to the stored grid ``[lo, hi]`` (:meth:`stored`)."""
        # clamp_max before clamp_min, each only where needed: TorchAO's float-output hardtanh pattern takes
        # clamp_max(clamp_min(int8 conv)) for a float hardtanh and fails on the uint8 conv (torchao 0.18)
        info = torch.iinfo(self.container)
        if hi < info.max:
            q = q.clamp_max(hi)
        if lo > info.min:
            q = q.clamp_min(lo)
        return q

    @property
    def narrow(self) -> bool:
        """True when the grid ``[quant_min, quant_max]`` is narrower than its 8-bit container."""
        info = torch.iinfo(self.container)
        return tuple(self.stored()[1:3]) != (info.min, info.max)

    def extra_repr(self) -> str:
        return (f"scale={self.scale.item():.6g}, zero_point={int(self.zero_point)}, "
                f"range=[{self.quant_min}, {self.quant_max}]")


class _IntegerLayer(nn.Module):
    """Shared state of the integer conv and linear: int weights, int32 bias, input and weight scales."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: float | torch.Tensor, weight_bits: int = 8, weight_container: str = "int8") -> None:
        super().__init__()
        if weight.dtype != torch.int8:
            raise TypeError(f"weight must be int8, got {weight.dtype}")
        if weight_container not in ("int8", "uint8"):
            raise ConfigError(f"weight_container must be 'int8' or 'uint8'; got {weight_container!r}")
        self.weight_bits = int(weight_bits)
        self.weight_container = weight_container  # how the traced form stores the weights (a target's choice)
        self.register_buffer("weight", weight.clone())
        self.register_buffer("weight_scale", weight_scale.detach().to(torch.float32).reshape(-1).clone())
        self.register_buffer("bias", None if bias is None else bias.to(torch.int32).clone())
        self.register_buffer("input_scale", torch.as_tensor(input_scale, dtype=torch.float32).reshape(1).clone())
        self._prepare_arithmetic()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare_arithmetic()  # new weights: decide float32/float64 again

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def output_scale(self) -> torch.Tensor:
        """``s_x * s_w`` per output channel (float32): the scale of the accumulator and of the bias."""
        return self.input_scale * self.weight_scale

    def accumulator_dtype(self, input_levels: int = 255) -> torch.dtype:
        """float32 when every accumulator value is an integer below 2**24 in magnitude, else float64.

        The worst case of output channel ``o`` is ``sum |w_o| * max|x_q - z_x| + |b_o|``.
        """
        if not self.weight.numel():
            return torch.float32
        row_l1 = self.weight.to(torch.int64).abs().flatten(1).sum(1)
        worst = row_l1 * input_levels
        if self.bias is not None and self.bias.numel():
            worst = worst + self.bias.to(torch.int64).abs()
        return torch.float32 if int(worst.max()) < _FLOAT32_EXACT else torch.float64

    def _prepare_arithmetic(self) -> None:
        self.accumulate_in = self.accumulator_dtype()
        dtype = self.accumulate_in  # weights and bias as exact floats, converted once
        self.register_buffer("_weight_acc", self.weight.to(dtype), persistent=False)
        self.register_buffer("_bias_acc", None if self.bias is None else self.bias.to(dtype), persistent=False)
        self.register_buffer("_output_scale", self.output_scale().to(dtype), persistent=False)
        # the traced form's bias scale and float bias, constants so exporters see no arithmetic on them
        self.register_buffer("_bias_scale", self.output_scale(), persistent=False)
        self.register_buffer("_float_bias", None if self.bias is None else
                             (self.bias.to(torch.float64) * self._bias_scale.to(torch.float64)).to(torch.float32),
                             persistent=False)
        self.float_bias = getattr(self, "float_bias", False)
        self.set_weight_container(self.weight_container)

    def set_weight_container(self, container: str) -> None:
        """Store the weights of the traced form as ``"int8"`` (zero point 0) or ``"uint8"`` (``w + 128``, zero
        point 128: ONNX Runtime's u8u8 kernels); the integer values, and the eager arithmetic, are unchanged."""
        self.weight_container = container
        shift = 128 if container == "uint8" else 0
        dtype = torch.uint8 if container == "uint8" else torch.int8
        self.register_buffer("_deploy_weight", (self.weight.to(torch.int16) + shift).to(dtype), persistent=False)
        self.register_buffer("_deploy_zero_point", torch.full((self.out_channels,), shift, dtype=torch.int64,
                                                              device=self.weight.device), persistent=False)
        self.register_buffer("_bias_zero_point", torch.zeros(self.out_channels, dtype=torch.int64,
                                                             device=self.weight.device), persistent=False)

    def reference_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias of the traced form: ``dequantize_per_channel`` of the integer constants."""
        dtype = self._deploy_weight.dtype
        info = torch.iinfo(dtype)
        weight = _qd.dequantize_per_channel.default(self._deploy_weight, self.weight_scale, self._deploy_zero_point,
                                                    0, info.min, info.max, dtype)
        bias = None
        if self.bias is not None and self.float_bias:
            bias = self._float_bias
        elif self.bias is not None:
            bias = _qd.dequantize_per_channel.default(self.bias, self._bias_scale, self._bias_zero_point, 0,
                                                      _INT32.min, _INT32.max, torch.int32)
        return weight, bias

    def set_float_bias(self, on: bool = True) -> None:
        """Trace the bias as the float constant ``b * s_x * s_w`` (float32) instead of ``dequantize_per_channel`` of
        the int32 bias: XNNPACK's delegate wants a float bias, which it quantizes back to int32 at scale
        ``s_x * s_w`` itself. The eager arithmetic is unchanged."""
        self.float_bias = bool(on)

    def _integers(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x.to(self.accumulate_in) / self.input_scale.to(self.accumulate_in))

    def _rescale(self, acc: torch.Tensor, out_dtype: torch.dtype, channel_dim: int) -> torch.Tensor:
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        return (acc * self._output_scale.reshape(shape)).to(out_dtype)


class QuantizedConv2d(_IntegerLayer):
    """One int8 conv: ``x`` (on the input grid) -> ``acc * s_x * s_w`` with exact integer ``acc``.

    ``weight`` holds the trained ``Q(M(theta))`` as int8, ``weight_scale`` its per-channel steps,
    ``bias`` the int32 bias at scale ``s_x * s_w``.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: float | torch.Tensor, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                 groups: int = 1, weight_bits: int = 8, weight_container: str = "int8") -> None:
        super().__init__(weight, weight_scale, bias, input_scale, weight_bits, weight_container)
        self.stride, self.padding = pair(stride), pair(padding)
        self.dilation, self.groups = pair(dilation), int(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tracing():  # x comes dequantized from the QuantizeDequantize before this layer
            weight, bias = self.reference_parameters()
            return F.conv2d(x, _as(weight, x.dtype), None if bias is None else _as(bias, x.dtype), self.stride,
                            self.padding, self.dilation, self.groups)
        acc = F.conv2d(self._integers(x), self._weight_acc, self._bias_acc, self.stride, self.padding,
                       self.dilation, self.groups)
        return self._rescale(acc, x.dtype, 1)

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return (f"{i * self.groups}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, weight_bits={self.weight_bits}, "
                f"bias={self.bias is not None}")


class QuantizedLinear(_IntegerLayer):
    """One int8 linear, the same arithmetic as :class:`QuantizedConv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tracing():
            weight, bias = self.reference_parameters()
            return F.linear(x, _as(weight, x.dtype), None if bias is None else _as(bias, x.dtype))
        return self._rescale(F.linear(self._integers(x), self._weight_acc, self._bias_acc), x.dtype, -1)

    def extra_repr(self) -> str:
        o, i = self.weight.shape
        return f"in_features={i}, out_features={o}, weight_bits={self.weight_bits}, bias={self.bias is not None}"


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, and no op at all in a traced graph when it has that type already (a no-op ``to`` between a
    dequantize and its conv hides the quantized pattern from XNNPACK's partitioner)."""
    return x if x.dtype == dtype else x.to(dtype)


__all__ = ["QuantizeDequantize", "QuantizedConv2d", "QuantizedLinear"]
