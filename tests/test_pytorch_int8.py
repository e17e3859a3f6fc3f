"""repq_fx.compile_int8: a lowered model through torch.compile as oneDNN int8 convolutions (x86 CPUs).

Structural: the compiled code calls one ``onednn.qconv_pointwise`` per lowered conv and one
``onednn.qlinear_pointwise`` per lowered linear, and no float convolution. Numerical: the compiled model's
outputs are within one output step of the eager lowered model on a contractive net (the integers are the
same; a float tie in a requantization may round the other way on another CPU), also for 4-bit
activations, whose narrow grid the fused conv would otherwise drop. The 16-bit pair-sum guard and the
argument checks need no compilation. Compiling tests take ~10 s each (tiny net, 16x16 inputs).
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import repq_fx
from repq_fx.testing.blocks import RepVGGNet
from repq_fx.quant.lowered import QuantizedConv2d, QuantizedLinear

from quantized_models import output_step, prepared

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (x86 CPU torch)")
_FLOAT_CONV = re.compile(r"extern_kernels\.convolution|mkldnn\._convolution_pointwise|aten\.convolution")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _lowered(**config) -> torch.fx.GraphModule:
    _, qmodel = prepared(lambda: RepVGGNet(widths=(8, 16), blocks_per_stage=1), (4, 1, 16, 16),
                         repq_fx.QConfig(**config))
    return repq_fx.lower(qmodel)


def _count(lowered: torch.fx.GraphModule, kind: type) -> int:
    return sum(isinstance(m, kind) for m in lowered.modules())


def _steps(got: torch.Tensor, ref: torch.Tensor, lowered: torch.fx.GraphModule) -> torch.Tensor:
    return (got - ref).abs() / output_step(lowered)


@pytest.mark.needs_cxx
@pytest.mark.parametrize("act_bits", [8, 4])
def test_one_int8_conv_per_lowered_conv_and_the_lowered_outputs(act_bits: int) -> None:
    lowered = _lowered(act_bits=act_bits)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 16, 16, generator=g)
    compiled = repq_fx.compile_int8(lowered)
    got, (code, *_) = run_and_get_code(compiled, x)
    assert code.count("torch.ops.onednn.qconv_pointwise") == _count(lowered, QuantizedConv2d) == 2
    assert code.count("torch.ops.onednn.qlinear_pointwise") == _count(lowered, QuantizedLinear) == 1
    assert not _FLOAT_CONV.search(code)
    batches = ((2, got), (3, None)) if act_bits == 8 else ((2, got),)  # batch 3 recompiles (static: 1-channel input)
    for batch, out in batches:
        xb = x if batch == 2 else torch.randn(batch, 1, 16, 16, generator=g)
        out = compiled(xb) if out is None else out
        steps = _steps(out, lowered(xb), lowered)
        assert (steps <= 1.001).float().mean() >= 0.999 and steps.max() <= 2.001, steps.max()
        assert torch.equal(out.argmax(1), lowered(xb).argmax(1))


@pytest.mark.needs_cxx
def test_example_inputs_compile_now_and_count_the_int8_ops() -> None:
    from torch._dynamo.utils import counters

    lowered = _lowered()
    before = counters["inductor"]["qconv_unary_lower_count"]
    compiled = repq_fx.compile_int8(lowered, (torch.randn(2, 1, 16, 16),))
    assert counters["inductor"]["qconv_unary_lower_count"] - before == 2  # ReLU and requantization fused
    assert not compiled.lowered.training and compiled(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_weights_that_overflow_16_bit_pair_sums_are_refused_before_compiling() -> None:
    lowered = _lowered(target="onnxruntime-vnni")  # full-range int8 weights behind 8-bit activations
    with pytest.raises(repq_fx.SaturationError, match="allow_vnni_only=True"):
        repq_fx.compile_int8(lowered)
    with pytest.warns(RuntimeWarning, match="exact only on x86 CPUs with VNNI"):
        repq_fx.compile_int8(lowered, allow_vnni_only=True)


@pytest.mark.parametrize("target, runtime", [("tensorrt", "TensorRT"), ("xnnpack", "ExecuTorch XNNPACK"),
                                             ("onnxruntime-u8u8", "ONNX Runtime u8u8")])
def test_a_model_trained_for_another_runtime_is_refused_naming_its_target(target: str, runtime: str) -> None:
    """Regression: the refusal named only the ONNX Runtime targets; it names the model's own target and runtime."""
    lowered = _lowered(target=target)
    with pytest.raises(repq_fx.SaturationError,
                       match=f"prepared for target '{target}', a grid for {runtime}.*target='onnxruntime'"):
        repq_fx.compile_int8(lowered)


def test_the_lowered_model_is_left_as_it_was() -> None:
    lowered = _lowered(target="onnxruntime-u8u8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        compiled = repq_fx.compile_int8(lowered, allow_vnni_only=True)
    conv = lowered.get_submodule("stages.0.0.quantized_conv")
    assert conv.weight_container == "uint8" and conv._deploy_weight.dtype == torch.uint8  # ONNX export unchanged
    copy = compiled.lowered.get_submodule("stages.0.0.quantized_conv")
    assert copy._deploy_weight.dtype == torch.int8 and torch.equal(copy.weight, conv.weight)


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(repq_fx.ConfigError, match="repq_fx.lower"):
        repq_fx.compile_int8(torch.nn.Conv2d(1, 1, 1))
    lowered = _lowered()
    with pytest.raises(repq_fx.ConfigError, match="freezing"):
        repq_fx.compile_int8(lowered, options={"freezing": False})
    with pytest.raises(repq_fx.ConfigError, match="dynamic=False"):
        repq_fx.compile_int8(lowered, dynamic=True)  # its first conv reads one channel
