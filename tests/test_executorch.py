"""ExecuTorch with XNNPACK: the lowered model as a ``.pte`` whose int8 convs XNNPACK runs.

Structural facts are read from the exported program (``get_delegation_info``: every conv delegated,
nothing but the output ``getitem`` left out) and from the integers (the ``xnnpack`` target's grid, the
int32 bias surviving XNNPACK's float bias); numbers are compared with the lowered model in output
quantization steps (>= 99.9 % within one step, same classes), which holds on any CPU because XNNPACK
accumulates int8 x int8 products exactly in int32 on x86 and, with ``|w| <= 127``, on ARM.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import repq_fx
from repq_fx.errors import ExportError
from repq_fx.testing.blocks import RepVGGNet
from repq_fx.quant.fake_quant import WeightFakeQuant
from repq_fx.quant.lowered import QuantizeDequantize, QuantizedConv2d
from repq_fx.targets import get_target
from quantized_models import prepared, trained_small_repvgg




def test_xnnpack_target_trains_int8_storage_and_weights_within_127() -> None:
    """The grid XNNPACK computes on every CPU: 8-bit weights in [-127, 127] (ARM's 16-bit pair sums of int8 x
    int8), activations stored as int8 (the uint8 grid shifted by 128)."""
    assert get_target("xnnpack").weight_range(8, 255) == (-127, 127)
    assert get_target("xnnpack").weight_range(4, 255) == (-8, 7)
    _, qmodel = prepared(lambda: RepVGGNet(widths=(8, 16, 32), blocks_per_stage=1), (4, 1, 28, 28),
                         repq_fx.QConfig(target="xnnpack"))
    assert {(q.quant_min, q.quant_max) for q in qmodel.modules() if isinstance(q, WeightFakeQuant)} == {(-127, 127)}
    lowered = repq_fx.lower(qmodel)
    stored = {m.stored()[1:] for m in lowered.modules() if isinstance(m, QuantizeDequantize)}
    assert stored == {(-128, 127, torch.int8)}
    x = torch.randn(2, 1, 28, 28)
    ops = {n.target for n in torch.export.export(lowered, (x,)).graph.nodes if n.op == "call_function"}
    q = torch.ops.quantized_decomposed.quantize_per_tensor.default
    assert q in ops and torch.ops.aten.to.dtype not in ops  # no no-op casts between dequantize and conv


def test_pte_delegates_every_conv_and_matches_the_lowered_model(tmp_path) -> None:
    pytest.importorskip("executorch", reason="ExecuTorch is not installed (pip install '.[deploy]')")
    from repq_fx.export.executorch_pte import export_pte, load_pte, run_pte

    torch.manual_seed(0)
    lowered = trained_small_repvgg("xnnpack")
    convs = sum(isinstance(m, QuantizedConv2d) for m in lowered.modules())
    x = torch.randn(16, 1, 28, 28)
    result = export_pte(lowered, (x,), str(tmp_path / "m.pte"))
    d = result.delegation
    assert (d.delegated_convs, d.non_delegated_convs, d.quantized_convs) == (convs, 0, 3)
    assert (d.delegated_linears, d.non_delegated_linears, d.subgraphs) == (1, 0, 1)
    assert d.non_delegated_ops == ()  # nothing left to ExecuTorch's portable kernels
    assert result.within_one_step >= 0.999
    y = x + 0.5 * torch.randn_like(x)  # other images, the same shape (the .pte has static shapes)
    got = run_pte(load_pte(result.path), (y,))[0]
    with torch.no_grad():
        ref = lowered(y)
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_a_model_trained_for_onnxruntime_runs_in_xnnpack_too(tmp_path) -> None:
    """The default grid (uint8 activations, |w| <= 64) fits XNNPACK's: the same trained model, shifted to int8."""
    pytest.importorskip("executorch", reason="ExecuTorch is not installed (pip install '.[deploy]')")
    from repq_fx.export.executorch_pte import export_pte

    _, qmodel = prepared(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)),
                         (4, 3, 12, 12))
    result = export_pte(repq_fx.lower(qmodel), (torch.randn(4, 3, 12, 12),), str(tmp_path / "m.pte"))
    assert (result.delegation.delegated_convs, result.delegation.non_delegated_convs) == (2, 0)
    assert result.within_one_step >= 0.999


def test_grids_xnnpack_cannot_hold_are_refused_or_warned() -> None:
    from repq_fx.export.executorch_pte import xnnpack_form

    net = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))  # noqa: E731
    _, four_bit = prepared(net, (4, 3, 12, 12), repq_fx.QConfig(act_bits=4, first_last_bits=None))
    with pytest.raises(ExportError, match="act_bits=8"):
        xnnpack_form(repq_fx.lower(four_bit))
    _, full = prepared(net, (4, 3, 12, 12), repq_fx.QConfig(target="onnxruntime-vnni"))
    lowered = repq_fx.lower(full)
    layer = lowered.get_submodule(next(n for n, m in lowered.named_modules() if isinstance(m, QuantizedConv2d)))
    layer.weight.view(-1)[:2] = -128  # two -128 in one output channel: 2 * (-128) * (-128) overflows int16
    layer._prepare_arithmetic()
    with pytest.warns(RuntimeWarning, match="ARM NEON"):
        model = xnnpack_form(lowered)
    for m in model.modules():  # the float bias XNNPACK requantizes gives back the trained int32 bias
        if isinstance(m, QuantizedConv2d):
            back = torch.round(m._float_bias.double() / m._bias_scale.double())
            assert np.array_equal(back.numpy(), m.bias.double().numpy())
