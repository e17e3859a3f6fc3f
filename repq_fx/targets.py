"""Deployment targets: the integer scheme a runtime executes exactly, fixed before training.

QAT trains exactly one integer grid, so the grid the runtime's kernels compute must be
chosen in ``QConfig(target=...)`` before training (torch.ao calls these backend configs).
A target says how weights are stored and which weight values a layer may use given the
bit width of its input.

The hazard that shapes the ONNX Runtime default: on x86 CPUs without VNNI (AVX2, and
AVX-512 without VNNI), ONNX Runtime's u8s8 convolution and GEMM kernels multiply uint8
activations by int8 weights with ``VPMADDUBSW``, which adds each *pair* of products in a
16-bit register and saturates. With 8-bit activations (up to 255) and full-range int8
weights (down to -128) a pair reaches ``2 * 255 * 128 = 65280``, far beyond 32767, and
the layer silently computes something else. ``"onnxruntime"`` therefore limits every
weight to ``|w| <= 32767 // (2 * a_max)`` where ``a_max`` is the largest integer the layer's
input can take: 64 for 8-bit inputs (what ONNX Runtime's own ``reduce_range`` does), no
limit for inputs of 7 bits or fewer. The limit is part of the trained grid, so the model
that runs is the model that trained; :mod:`repq_fx.export.saturation` checks it statically.

>>> get_target("onnxruntime").weight_range(bits=8, input_max=255)
(-64, 64)
>>> get_target("onnxruntime").weight_range(bits=8, input_max=15)   # 4-bit input: no limit
(-128, 127)
>>> get_target("onnxruntime-u8u8").weight_range(bits=8, input_max=255)
(-128, 127)

TensorRT's explicit quantization is symmetric: zero point 0, int8 activations in [-128, 127] and
weights in [-127, 127] ("for legacy reasons", TensorRT's developer guide on quantized ONNX models;
MQBench's TensorRT backend uses the same two ranges). Its int8 convolutions accumulate in int32, so
there is no pair-sum limit:

>>> trt = get_target("tensorrt")
>>> trt.symmetric_activations, trt.weight_range(bits=8, input_max=128)
(True, (-127, 127))
>>> get_target("xnnpack").weight_range(bits=8, input_max=255)   # int8 inputs, ARM's 16-bit pair sums
(-127, 127)
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

INT16_MAX = 32767
ACTIVATION_SHIFT = 128  # uint8 -> int8 storage of an activation grid: q - 128, zero point z - 128


@dataclass(frozen=True)
class Target:
    """The integer scheme of one runtime (one row of :data:`TARGETS`)."""

    name: str
    summary: str  # one line for --help and error messages
    weight_container: str  # "int8", or "uint8": stored as w + 128 with zero point 128 (u8u8 kernels)
    int16_pair_sums: bool  # the runtime may add two products in 16 bits (u8s8 kernels without VNNI)
    exact_on: str  # the CPUs on which the runtime computes this grid exactly
    symmetric_activations: bool = False  # signed activations, zero point 0 (else unsigned with a zero point)
    narrow_weights: bool = False  # weights in [-(2^(b-1) - 1), 2^(b-1) - 1]: TensorRT's [-127, 127]
    quantize_add_inputs: bool = False  # conv -> add(other): Q/DQ on `other`, none between the conv and the add
    # "uint8", or "int8": an activation grid [0, 2**b - 1] with zero point z stored as [-128, 2**b - 129] with
    # zero point z - 128 (the same grid; XNNPACK's qint8 tensors); None: each grid in its own type (a signed,
    # symmetric grid stays int8)
    activation_container: str | None = "uint8"
    act_bits: int | None = None  # the only activation width the runtime quantizes to (None: any of 2-8)

    def __post_init__(self) -> None:
        wrong = [f"{name}={value!r} (one of {choices})" for name, value, choices in (
            ("weight_container", self.weight_container, ("int8", "uint8")),
            ("activation_container", self.activation_container, ("uint8", "int8", None)),
            ("act_bits", self.act_bits, (None, *range(2, 9)))) if value not in choices]
        if wrong:
            raise ConfigError(f"Target {self.name!r}: {'; '.join(wrong)}")

    def stored_input_max(self, input_max: int) -> int:
        """The largest magnitude of an activation integer as this runtime stores it: ``input_max`` in uint8,
        ``max(128, input_max - 128)`` once shifted into int8."""
        if self.activation_container == "int8":
            return max(ACTIVATION_SHIFT, int(input_max) - ACTIVATION_SHIFT)
        return int(input_max)

    def weight_range(self, bits: int, input_max: int) -> tuple[int, int]:
        """The integer range of a layer's weights: symmetric ``bits`` bits, narrowed where 16-bit pair
        sums of ``stored input * |w|`` could overflow."""
        lo, hi = -(2 ** (bits - 1)) + int(self.narrow_weights), 2 ** (bits - 1) - 1
        if self.int16_pair_sums:
            limit = INT16_MAX // (2 * max(self.stored_input_max(input_max), 1))
            lo, hi = max(lo, -limit), min(hi, limit)
        return lo, hi


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add a target to :data:`TARGETS` (a name already there is replaced).

    >>> t = register_target(Target("my-npu", "an NPU with int32 accumulators", "int8", False, "my NPU"))
    >>> get_target("my-npu").summary
    'an NPU with int32 accumulators'
    >>> del TARGETS["my-npu"]
    """
    if not isinstance(target, Target):
        raise ConfigError(f"register_target() takes a Target; got {type(target).__name__}")
    TARGETS[target.name] = target
    return target


register_target(Target(
    "onnxruntime", "ONNX Runtime u8s8 (QLinearConv/QGemm): uint8 activations, int8 weights kept small enough "
    "that no 16-bit pair sum overflows (|w| <= 64 behind 8-bit activations)", "int8", True,
    "every CPU: x86 with or without VNNI, ARM"))
register_target(Target(
    "onnxruntime-u8u8", "ONNX Runtime u8u8: full-range 8-bit weights stored as uint8 (zero point 128); "
    "exact everywhere, slower kernels", "uint8", False, "every CPU: x86 with or without VNNI, ARM"))
register_target(Target(
    "onnxruntime-vnni", "ONNX Runtime u8s8 with full-range int8 weights: exact only where the kernels "
    "accumulate in 32 bits", "int8", False,
    "x86 with AVX512-VNNI or AVX-VNNI, and ARM (wrong on other x86 CPUs: 16-bit pair sums saturate)"))

register_target(Target(
    "tensorrt", "TensorRT explicit quantization (Q/DQ ONNX): int8 activations in [-128, 127] with zero point 0 "
    "(after a ReLU only [0, 127] is used: TensorRT's symmetric scheme wastes the sign bit there, and the QAT "
    "trains with it), per-channel int8 weights in [-127, 127], Q/DQ on the residual input of conv + add so "
    "TensorRT fuses conv + add + ReLU; int32 accumulators (no pair-sum limit)", "int8", False,
    "NVIDIA GPUs (TensorRT); ONNX Runtime's CPU kernels with int8 QDQ kept (session.qdqisint8allowed=1, measured "
    "on x86 AVX2); not OpenVINO or compile_int8 on x86 (they shift int8 activations into uint8, where 16-bit pair "
    "sums overflow without VNNI)",
    symmetric_activations=True, narrow_weights=True, quantize_add_inputs=True, activation_container=None,
    act_bits=8))

# XNNPACK (ExecuTorch's CPU backend) runs qs8 convs: int8 activations (per tensor, any zero point), int8
# per-channel weights with zero point 0, int32 bias. Its x86 kernels accumulate pairs in 32 bits (AVX2
# vpmaddwd on sign-extended int16, VNNI vpdpbusd), but the ARM NEON "mlal" kernels add two int8 x int8
# products in an int16 (vmull_s8 + vmlal_s8): 2 * 128 * 128 overflows, so |w| <= 127, as XNNPACK's own
# quantizer (qmin -127) trains
register_target(Target(
    "xnnpack", "ExecuTorch XNNPACK qs8 convs: int8 activations (the uint8 grid shifted by 128), int8 per-channel "
    "weights in [-127, 127] (16-bit pair sums of ARM's NEON kernels)", "int8", True,
    "every CPU: x86 (32-bit pair sums) and ARM", activation_container="int8"))

DEFAULT_TARGET = "onnxruntime"
# the grid every model was trained on before targets existed (full-range int8 weights)
LEGACY_TARGET = "onnxruntime-vnni"


def get_target(name: str) -> Target:
    """The registered target ``name``; an unknown name is a :class:`~repq_fx.errors.ConfigError`.

    >>> get_target("tflite")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    repq_fx.errors.ConfigError: QConfig.target must be one of 'onnxruntime', 'onnxruntime-u8u8', ...; got 'tflite'
    """
    if name not in TARGETS:
        raise ConfigError(f"QConfig.target must be one of {', '.join(repr(t) for t in TARGETS)}; got {name!r}")
    return TARGETS[name]


__all__ = ["Target", "TARGETS", "ACTIVATION_SHIFT", "DEFAULT_TARGET", "LEGACY_TARGET", "get_target", "register_target"]
