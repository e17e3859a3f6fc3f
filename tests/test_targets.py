"""Deployment targets (``QConfig.target``): the integer grid trained is the one the runtime computes exactly.

The hazard: ONNX Runtime's u8s8 kernels on x86 without VNNI add pairs of uint8 x int8 products in
16 bits and saturate. The tests here do not depend on the CPU they run on: the static check reads
the integers of the lowered model, and ONNX Runtime is compared layer by layer with the lowered
model (``segment_parity``), so a layer that ORT computes wrong fails on every machine whose kernels
get it wrong, and none passes only thanks to a lucky kernel.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import repq_fx
from repq_fx.testing.blocks import RepVGGNet
from repq_fx.export.saturation import int16_pair_overflows, worst_pair_sum
from repq_fx.quant.fake_quant import WeightFakeQuant
from repq_fx.targets import INT16_MAX, TARGETS, get_target
from quantized_models import prepared

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(2, 8), input_bits=st.integers(1, 8))
def test_weight_range_keeps_every_pair_sum_in_int16(bits: int, input_bits: int) -> None:
    input_max = 2 ** input_bits - 1
    lo, hi = get_target("onnxruntime").weight_range(bits, input_max)
    assert input_max * 2 * max(-lo, hi) <= INT16_MAX  # the worst pair: two extreme weights, two extreme inputs
    full = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert full[0] <= lo < 0 < hi <= full[1]
    if input_max * 2 * 2 ** (bits - 1) <= INT16_MAX:  # the full grid is safe: nothing is taken away
        assert (lo, hi) == full
    for name in ("onnxruntime-u8u8", "onnxruntime-vnni"):  # 32-bit accumulation: the full grid
        assert TARGETS[name].weight_range(bits, input_max) == full


def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.mark.parametrize("act_bits, expected", [(8, (-64, 64)), (7, (-128, 127)), (4, (-128, 127))])
def test_prepare_trains_the_target_grid(act_bits: int, expected: tuple[int, int]) -> None:
    """Every weight quantizer's grid follows from its input's bit width: 8-bit inputs narrow 8-bit weights to
    |w| <= 64, 7-bit inputs or fewer leave the full int8 grid."""
    qmodel = repq_fx.prepare(_conv_net(), repq_fx.QConfig(act_bits=act_bits, first_last_bits=None))
    grids = {(q.quant_min, q.quant_max) for q in qmodel.modules() if isinstance(q, WeightFakeQuant)}
    assert grids == {expected}


def test_first_layer_reads_8_bit_input_whatever_the_common_width() -> None:
    qmodel = repq_fx.prepare(_conv_net(), repq_fx.QConfig(weight_bits=8, act_bits=4))  # first/last at 8 bits
    grids = [(q.quant_min, q.quant_max) for q in qmodel.modules() if isinstance(q, WeightFakeQuant)]
    assert grids[0] == (-64, 64)  # reads the 8-bit model input
    assert (-128, 127) in grids[1:]  # reads 4-bit activations: no pair can overflow


def test_unknown_target_is_a_config_error() -> None:
    with pytest.raises(repq_fx.ConfigError, match="QConfig.target must be one of 'onnxruntime'"):
        repq_fx.QConfig(target="tensorrt-v1")


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_default_target_cannot_overflow_on_real_models(name: str) -> None:
    """The static check, on every CPU: no int8 layer of a lowered timm model can saturate a 16-bit pair sum;
    the same model prepared for VNNI CPUs can."""
    timm = pytest.importorskip("timm")
    shape = (4, 3, 32, 32)
    _, qmodel = prepared(lambda: timm.create_model(name, pretrained=False), shape, gain=1.0)
    assert int16_pair_overflows(repq_fx.lower(qmodel)) == []
    _, vnni = prepared(lambda: timm.create_model(name, pretrained=False), shape,
                       repq_fx.QConfig(target="onnxruntime-vnni"), gain=1.0)
    overflows = int16_pair_overflows(repq_fx.lower(vnni))
    assert overflows and all(o.worst > INT16_MAX for o in overflows)


def test_worst_pair_sum_is_the_two_largest_magnitudes_of_one_channel() -> None:
    w = torch.tensor([[3, -100, 2, 90], [-127, 1, 0, 0]], dtype=torch.int8).reshape(2, 4, 1, 1)
    assert worst_pair_sum(w, 255) == 255 * max(100 + 90, 127 + 1)


def _vnni_lowered() -> torch.fx.GraphModule:
    _, qmodel = prepared(RepVGGNet, (8, 1, 28, 28), repq_fx.QConfig(target="onnxruntime-vnni"), gain=1.0)
    return repq_fx.lower(qmodel)


def test_export_refuses_weights_that_can_overflow_the_default_target(tmp_path) -> None:
    lowered = _vnni_lowered()
    with pytest.raises(repq_fx.SaturationError, match=r"stages\.0\.0\.quantized_conv: 255 \* .* > 32767"):
        repq_fx.export_onnx(lowered, (torch.randn(1, 1, 28, 28),), str(tmp_path / "m.onnx"), target="onnxruntime")


def test_vnni_target_exports_with_a_warning_naming_the_cpus(tmp_path) -> None:
    with pytest.warns(RuntimeWarning, match="exact only on x86 with AVX512-VNNI or AVX-VNNI"):
        repq_fx.export_onnx(_vnni_lowered(), (torch.randn(1, 1, 28, 28),), str(tmp_path / "m.onnx"))


def test_u8u8_target_is_exact_layer_by_layer_with_full_range_weights(tmp_path) -> None:
    """Full-range int8 weights written as uint8 with zero point 128: ORT still fuses every conv into a
    QLinearConv and, with 16-bit multiplies and 32-bit sums, computes each layer right on any CPU."""
    from repq_fx.export.parity import check_onnx_runtime

    lowered = _vnni_lowered()
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        model = repq_fx.export_onnx(lowered, (torch.randn(1, 1, 28, 28),), path, target="onnxruntime-u8u8")
    weights = [t for t in model.graph.initializer if t.name.endswith("_deploy_weight")]
    assert len(weights) == lowered.lowered_layers and all(t.data_type == onnx.TensorProto.UINT8 for t in weights)
    parity = check_onnx_runtime(path, lowered, (torch.randn(16, 1, 28, 28),))
    assert parity.ops["QLinearConv"] == 9 and parity.ops["Conv"] == 0


def test_check_finds_a_layer_the_runtime_computes_wrong_on_any_cpu(tmp_path) -> None:
    """A file whose int8 weights differ from the lowered model's in one layer: check=True must fail and name
    that layer, whatever the CPU (this is what saturation looks like to the check on a non-VNNI CPU)."""
    from repq_fx.export.parity import check_onnx_runtime

    _, qmodel = prepared(RepVGGNet, (8, 1, 28, 28), gain=1.0)
    lowered = repq_fx.lower(qmodel)
    path = str(tmp_path / "m.onnx")
    model = repq_fx.export_onnx(lowered, (torch.randn(1, 1, 28, 28),), path, check=True)
    check_onnx_runtime(path, lowered, (torch.randn(8, 1, 28, 28),))
    weight = next(t for t in model.graph.initializer if t.name == "stages.1.0.quantized_conv._deploy_weight")
    values = onnx.numpy_helper.to_array(weight).copy()
    values[0] = -values[0]
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, path)
    with pytest.raises(repq_fx.ExportCheckError, match=r"stages\.1\.0\.quantized_conv: .* within one step"):
        check_onnx_runtime(path, lowered, (torch.randn(8, 1, 28, 28),))


def test_layer_parity_holds_where_end_to_end_parity_is_lost_to_chaos(tmp_path) -> None:
    """A random-init timm mobileone_s0 with calibrated BN statistics (no damping): rounding ties, one step at
    ~1e-5 of one layer's outputs, grow through 40 layers, but every layer on its own inputs agrees."""
    from repq_fx.export.parity import segment_parity

    timm = pytest.importorskip("timm")
    _, qmodel = prepared(lambda: timm.create_model("mobileone_s0", pretrained=False), (8, 3, 64, 64), gain=1.0)
    lowered = repq_fx.lower(qmodel)
    path = str(tmp_path / "m.onnx")
    repq_fx.export_onnx(lowered, (torch.randn(1, 3, 64, 64),), path)
    segments = segment_parity(path, lowered, (torch.randn(8, 3, 64, 64),))
    assert len(segments) > 40
    bad = [str(s) for s in segments if not s.ok]
    assert not bad, bad
    mismatched = np.mean([1 - s.within_one_step for s in segments])
    assert mismatched < 1e-3


def test_cli_export_check_exits_1_with_the_reason(tmp_path, monkeypatch, capsys) -> None:
    """`repq-fx export --check` printed 91 % agreement and exited 0; a failed check now exits 1 and says why."""
    from repq_fx.app import cli
    from repq_fx.export import parity

    def disagree(path, lowered, inputs, threads=1):
        raise repq_fx.ExportCheckError("ONNX Runtime disagrees with the lowered model in 1 layers (...)")

    monkeypatch.setattr(parity, "check_onnx_runtime", disagree)
    out = tmp_path / "m.onnx"
    assert cli.main(["export", "repq_fx.testing.blocks:RepVGGNet", "--input-size", "1x28x28", "--out", str(out),
                     "--check"]) == 1
    assert "check failed: ONNX Runtime disagrees" in capsys.readouterr().err


def test_cpu_features_name_what_is_missing() -> None:
    from repq_fx.export.parity import cpu_int8_features

    assert "AVX2 but no VNNI" in cpu_int8_features(["avx", "avx2", "fma"], "x86_64")
    assert "AVX512 but no VNNI" in cpu_int8_features(["avx2", "avx512f", "avx512bw"], "x86_64")
    assert cpu_int8_features(["avx2", "avx_vnni"], "x86_64") == "an x86 CPU with AVX-VNNI"
    assert cpu_int8_features([], "aarch64") == "a non-x86 CPU (aarch64)"


@pytest.mark.parametrize("fields", [dict(act_bits=0), dict(activation_container="int3"), dict(weight_container="u4")])
def test_a_target_with_impossible_fields_is_refused(fields: dict) -> None:
    """Regression: Target(act_bits=0) was accepted, and QConfig then asked to train 0-bit activations."""
    from repq_fx.targets import Target

    with pytest.raises(repq_fx.errors.ConfigError, match=next(iter(fields))):
        Target("npu", "an NPU", **{"weight_container": "int8", "int16_pair_sums": False, "exact_on": "it", **fields})


def test_registries_take_their_own_records_only() -> None:
    from repq_fx.export.formats import register_format
    from repq_fx.targets import register_target

    with pytest.raises(repq_fx.errors.ConfigError, match="takes a Target"):
        register_target("npu")
    with pytest.raises(repq_fx.errors.ConfigError, match="takes a Format"):
        register_format("tflite")
