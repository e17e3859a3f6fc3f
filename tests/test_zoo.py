"""benchmarks/zoo.py, the instrument issues 12 and 13 are judged by, on two small models.

Each model runs every stage of the zoo (explain, merge, prepare + calibrate, 2 SGD steps, lower,
export + ONNX Runtime) at 32x32, BN gain 1 (no damping). Asserted, because they hold on any x86-64
CPU: every stage through ``lower`` succeeds; merge equals ``model.eval()`` in float64 to 1e-9; every
layer of the lowered model, fed the prepared model's own input, is within one output step of the
prepared model (end to end, the difference of random networks grows with depth: reported, not
asserted); no conv stays float; the ONNX file exports (torch.onnx) and ORT's optimized graph has
one ``QLinearConv`` (or ``ConvInteger``) per int8 conv and no float conv; and ONNX
Runtime agrees with the lowered model layer by layer (``segment_parity``), which the default
target ('onnxruntime', weights narrowed so 16-bit pair sums cannot saturate) makes hold on every
x86-64 CPU. End-to-end ORT parity of a random network is reported, not asserted.
"""
from __future__ import annotations

import argparse
import doctest
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
THROUGH_LOWER = ("build", "explain", "merge", "prepare", "train", "lower")


def _load_zoo():
    if "zoo_bench" in sys.modules:
        return sys.modules["zoo_bench"]
    spec = importlib.util.spec_from_file_location("zoo_bench", ROOT / "benchmarks" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_bench"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def zoo():
    return _load_zoo()


@pytest.fixture(scope="module", params=["torchvision:resnet18", "timm:repvgg_a0"])
def record(request, zoo):
    return zoo.run_model(request.param, size=32)


def test_stages_through_lower_succeed(record):
    failed = {s: record["stages"][s].get("error") or record["stages"][s].get("skipped")
              for s in THROUGH_LOWER if not record["stages"][s]["ok"]}
    assert not failed, failed
    assert record["size"] == 32


def test_merge_is_exact_in_float64(record):
    merge = record["stages"]["merge"]
    assert merge["rel_err"] <= 1e-9
    assert merge["convs_after"] <= merge["convs_before"]


def test_lowered_matches_prepared_layer_by_layer(record, zoo):
    lower = record["stages"]["lower"]
    assert lower["layer_max_steps"] <= zoo.WITHIN, lower["layer_worst"]
    assert lower["layer_share_off"] < 0.01  # only the int32 bias rounding differs
    assert lower["float_convs"] == 0
    assert lower["quantized_convs"] == record["stages"]["explain"]["blocks_merged"]
    # end to end: reported (chaos of a random network), not asserted
    assert lower["max_steps"] >= 0 and lower["argmax"][1] == record["batch"]


def test_export_runs_one_int8_conv_per_lowered_conv(record):
    export = record["stages"]["export"]
    assert export["ok"], export.get("error")
    # one QLinearConv/ConvInteger in ORT's optimized graph per QuantizedConv2d call, no float conv
    assert export["qlinearconv_expected"] == record["stages"]["lower"]["quantized_convs"] > 0
    assert export["ort_int8_convs"] == export["qlinearconv_expected"] and export["ort_float_convs"] == 0, export["ops"]
    assert export["ops_ok"] and export["lowered_float_convs"] == 0


def test_export_is_exact_in_onnx_runtime_layer_by_layer(record):
    export = record["stages"]["export"]
    assert "ort_layer_error" not in export, export.get("ort_layer_error")
    # the default target ('onnxruntime') narrows weights so no ORT kernel saturates on any x86-64 CPU:
    # every segment (quantizer to quantizer, fed the lowered model's own values) within one step
    assert export["ort_layers"] >= record["stages"]["lower"]["quantized_convs"]
    assert export["ort_layers_bad"] == 0, export["ort_layers_bad_list"]
    assert export["ort_layer_max_steps"] <= 1.001 and export["ort_layer_min_within"] >= 0.999
    # end to end, one-step ties can grow through a random network: reported, not asserted
    assert 0.0 <= export["ort_within_one_step"] <= 1.0 and export["ort_max_steps"] >= 0
    assert 0.0 <= export["ort_unoptimized_within_one_step"] <= 1.0


@pytest.mark.parametrize("inplace", [False, True])
def test_per_layer_ort_parity_does_not_depend_on_in_place_activations(zoo, inplace):
    """An in-place ReLU6 after a quantized conv (MobileNet, EfficientNet) computes the same as an
    out-of-place one, so ORT must be found exact layer by layer in both."""
    import torch
    import torch.nn as nn

    import repq_fx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(inplace=inplace), nn.Conv2d(8, 8, 3))
    qmodel = repq_fx.prepare(model.eval())
    repq_fx.calibrate(qmodel, [torch.randn(4, 3, 16, 16)])
    lowered = repq_fx.lower(qmodel)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        state = {"lowered": lowered, "lowered_out": lowered(x), "quantized_convs": 2}
    out: dict = {}
    zoo.stage_export(model, x, None, None, state, out)
    assert out["ops_ok"] and out["ort_int8_convs"] == 2, out["ops"]
    assert out["ort_layers"] >= 2 and out["ort_layers_bad"] == 0, out["ort_layers_bad_list"]


def test_export_failures_are_flagged_in_the_table(zoo):
    export = {"ok": True, "seconds": 1.0, "ops": {"QLinearConv": 3, "Conv": 1}, "ops_ok": False,
              "ort_int8_convs": 3, "ort_float_convs": 1, "qlinearconv_expected": 4, "ort_within_one_step": 1.0,
              "ort_max_steps": 0.0, "ort_unoptimized_within_one_step": 1.0, "ort_layers": 5, "ort_layers_bad": 1,
              "ort_layers_bad_list": ["conv: 50.00 % within one step (max 9.0)"], "ort_layer_max_steps": 9.0,
              "ort_layer_worst": "relu_q", "ort_layer_min_within": 0.5}
    record = {"model": "timm:b", "size": 64, "reached": "export", "failed": None, "stages": {"export": export}}
    row = next(line for line in zoo.table([record], ["export"]).splitlines() if line.startswith("| timm:b"))
    assert "BAD 3/4, 1 float" in row and "1/5 off, max 9" in row
    assert "ORT: 1 of 5 layers off (worst 9 steps, relu_q)" in row


def test_table_lists_every_model_and_failure(zoo):
    records = [{"model": "timm:a", "size": 64, "reached": "explain", "failed": "merge",
                "stages": {"explain": {"ok": True, "seconds": 1.0, "blocks_merged": 2, "blocks": 3,
                                       "convs_in_merged": 4, "convs_in_blocks": 5, "left_out_count": 0,
                                       "duplicate_block_names": 1},
                           "merge": {"ok": False, "seconds": 0.5,
                                     "error": {"type": "TypeError", "message": "'Node' object is not iterable",
                                               "frame": "repq_fx/patterns/linear_ops.py:10 _avg_pool"}},
                           "prepare": {"ok": False, "skipped": "needs build"}}}]
    text = zoo.table(records, ["explain", "merge", "prepare"])
    row = next(line for line in text.splitlines() if line.startswith("| timm:a"))
    assert "merge: TypeError: 'Node' object is not iterable" in row and "FAIL 0.5" in row and "skip" in row
    assert "1 duplicate block names" in row
    assert "- timm:a, merge: TypeError: 'Node' object is not iterable (repq_fx/patterns/linear_ops.py:10 " \
           "_avg_pool)" in text


def test_a_timeout_is_the_error_of_the_running_stage(zoo, tmp_path):
    args = zoo.parse_args(["--models", "torchvision:resnet18", "--stages", "explain", "--timeout", "0.5"])
    record = zoo.run_isolated("torchvision:resnet18", args)
    assert record["reached"] is None and record["failed"] == "build"
    assert record["stages"]["build"]["error"]["type"] == "Timeout"


def test_helpers_doctests(zoo):
    assert doctest.testmod(zoo, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0
