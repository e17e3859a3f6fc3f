"""OpenVINO (CPU) on the QDQ ONNX of ``export_onnx``: int8 kernels, layer by layer within one step.

The structural fact comes from the compiled model's runtime graph (each conv's ``runtimePrecision``
is u8/i8, none f32); the numbers are compared with the lowered model per layer on its own inputs
(``check_openvino``: >= 99.9 % within one output step, no integer layer further) and end to end by
class. The default target's grid (``|w| <= 64`` behind 8-bit inputs) keeps oneDNN's 16-bit pair sums
on x86 without VNNI from saturating, so this holds on any x86 CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import repq_fx
from repq_fx.quant.lowered import QuantizedConv2d
from quantized_models import prepared, trained_small_repvgg

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install '.[deploy]')")
pytest.importorskip("onnxruntime", reason="export_onnx needs onnx and onnxruntime (pip install '.[onnx]')")

from repq_fx.export.openvino_ir import (check_openvino, compile_model, run,  # noqa: E402
                                        runtime_precisions, save_ir)




def test_openvino_runs_every_conv_in_int8_and_matches_layer_by_layer(tmp_path) -> None:
    torch.manual_seed(0)
    lowered = trained_small_repvgg()
    path = str(tmp_path / "m.onnx")
    repq_fx.export_onnx(lowered, (torch.randn(1, 1, 28, 28),), path)
    x = torch.randn(16, 1, 28, 28)
    result = check_openvino(path, lowered, (x,))  # raises if a layer is more than one step off
    convs = sum(isinstance(m, QuantizedConv2d) for m in lowered.modules())
    assert (result.int8_convs, result.float_convs, result.int8_gemms) == (convs, 0, 1)
    assert result.layers >= convs and result.worst_layer_within >= 0.999
    got = run(compile_model(path), (x,))[0]
    with torch.no_grad():
        assert np.array_equal(got.argmax(1), lowered(x).argmax(1).numpy())

    xml = save_ir(path, str(tmp_path / "m.xml"))  # the IR runs the same int8 kernels, the same numbers
    compiled = compile_model(xml)
    assert sum(n for (kind, p), n in runtime_precisions(compiled).items()
               if kind == "Convolution" and p in ("u8", "i8")) == convs
    np.testing.assert_array_equal(run(compiled, (x,))[0], got)


def test_missing_onnx_file_is_an_export_error(tmp_path) -> None:
    with pytest.raises(repq_fx.errors.ExportError, match="export it first"):
        save_ir(str(tmp_path / "none.onnx"), str(tmp_path / "m.xml"))


def test_onnx_of_an_xnnpack_model_is_refused_where_x86_kernels_would_saturate(tmp_path) -> None:
    """x86 ONNX runtimes (ONNX Runtime, OpenVINO) run int8 activations as uint8, so the xnnpack grid's |w| up to 127
    can overflow their 16-bit pair sums (measured here with OpenVINO on AVX2: a layer 25 steps off): export_onnx
    checks the pairs on the uint8 grid and refuses, naming the target that trains an exact grid."""
    _, qmodel = prepared(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), (4, 3, 12, 12),
                         repq_fx.QConfig(target="xnnpack"))
    lowered = repq_fx.lower(qmodel)
    assert max(int(m.weight.abs().max()) for m in lowered.modules() if isinstance(m, QuantizedConv2d)) > 64
    with pytest.raises(repq_fx.errors.SaturationError, match="target='onnxruntime'"):
        repq_fx.export_onnx(lowered, (torch.randn(1, 3, 12, 12),), str(tmp_path / "m.onnx"))


def test_openvino_file_of_a_tensorrt_model_is_refused_where_x86_kernels_would_saturate(tmp_path) -> None:
    """Regression: the tensorrt grid's signed activations reach 128 in ONNX Runtime's view (int8 kept) and passed
    the pair-sum check, but OpenVINO shifts them into uint8 (up to 255): a written IR was up to 10 steps off."""
    from repq_fx.export.formats import FORMATS
    from repq_fx.export.saturation import int16_pair_overflows

    _, qmodel = prepared(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), (4, 3, 12, 12),
                         repq_fx.QConfig(target="tensorrt"))
    lowered = repq_fx.lower(qmodel)
    assert int16_pair_overflows(lowered, stored=False) == []  # ONNX Runtime's view: exact
    shifted = int16_pair_overflows(lowered, stored=False, signed_as_uint8=True)
    assert shifted and all(o.input_max == 255 for o in shifted)
    with pytest.raises(repq_fx.errors.SaturationError, match="OpenVINO runs as uint8.*target='onnxruntime'"):
        FORMATS["openvino"].write(lowered, torch.randn(1, 3, 12, 12), str(tmp_path / "m.xml"), None)
    assert list(tmp_path.iterdir()) == []


def test_openvino_file_is_written_alone_and_checked_itself(tmp_path) -> None:
    """Regression: the intermediate ONNX replaced a sibling m.onnx (or, with --out m.onnx, the output itself),
    and --check ran that sibling instead of the written IR."""
    from repq_fx.export.formats import FORMATS, format_for

    for path in ("m.onnx", "m"):
        with pytest.raises(repq_fx.errors.ConfigError, match=r"format openvino writes a \.xml file.*name it m\.xml"):
            format_for(path, "openvino")
    with pytest.raises(repq_fx.errors.ConfigError, match=r"writes a \.onnx file"):
        format_for("m.bin", "onnx")
    torch.manual_seed(0)
    lowered, other = trained_small_repvgg(), trained_small_repvgg(steps=1)
    (tmp_path / "m.onnx").write_text("the user's own file")
    xml, x = str(tmp_path / "m.xml"), torch.randn(16, 1, 28, 28)
    FORMATS["openvino"].write(lowered, x[:1], xml, None)
    assert (tmp_path / "m.onnx").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.onnx", "m.xml"]
    assert "OpenVINO IR m.xml" in FORMATS["openvino"].check(xml, lowered, x, None)
    with pytest.raises(repq_fx.errors.ExportCheckError, match="is not the model that was checked"):
        FORMATS["openvino"].check(xml, other, x, None)  # the file on disk is another model's
