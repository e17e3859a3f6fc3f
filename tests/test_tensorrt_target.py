"""The "tensorrt" target: symmetric int8 activations (zero point 0), weights in [-127, 127], and Q/DQ
where TensorRT fuses them (conv inputs, the residual input of conv + add).

Nothing here needs a GPU: the QAT grid is read from the quantizers, the file's form from its ONNX
graph (``check_tensorrt_qdq``), and its numbers from ONNX Runtime layer by layer, which keeps int8
QDQ signed (``session.qdqisint8allowed``) and computes the same integer grid on any CPU.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import repq_fx
from repq_fx.app import cli
from repq_fx.app.cli import deploying
from repq_fx.export.parity import segment_parity
from repq_fx.quant.fake_quant import ActFakeQuant, WeightFakeQuant
from repq_fx.targets import get_target

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from repq_fx.export.tensorrt_check import check_tensorrt_qdq  # noqa: E402  (needs onnx)

TRT = repq_fx.QConfig(target="tensorrt")


def _cbr(cin: int, cout: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class ResNetLike(nn.Module):
    """A stem, a basic block with an identity shortcut and one with a strided 1x1 conv shortcut, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.a1, self.a2 = _cbr(8, 8), _cbr(8, 8, relu=False)
        self.b1, self.b2 = _cbr(8, 16, 2), _cbr(16, 16, relu=False)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.a2(self.a1(x)) + x)
        x = torch.relu(self.b2(self.b1(x)) + self.down(x))
        return self.head(x)


def _plain() -> nn.Module:
    return nn.Sequential(_cbr(3, 8), _cbr(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _trained(config: repq_fx.QConfig = TRT, steps: int = 4) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    qmodel = repq_fx.prepare(ResNetLike(), config)
    repq_fx.calibrate(qmodel.train(), [torch.randn(8, 3, 12, 12) for _ in range(2)])
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(qmodel(torch.randn(8, 3, 12, 12)), torch.randint(0, 5, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qmodel.eval()


@pytest.fixture(scope="module")
def trained() -> torch.fx.GraphModule:
    return _trained()


@pytest.fixture(scope="module")
def exported(trained: torch.fx.GraphModule, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[str, torch.fx.GraphModule, onnx.ModelProto]:
    """The trained model lowered and exported with ``check=True`` (the form, then ONNX Runtime)."""
    lowered = repq_fx.lower(trained)
    path = str(tmp_path_factory.mktemp("trt") / "m.onnx")
    return path, lowered, repq_fx.export_onnx(lowered, (torch.randn(4, 3, 12, 12),), path, check=True)


def test_qat_trains_a_symmetric_int8_grid(trained: torch.fx.GraphModule) -> None:
    """After calibration and SGD steps every activation grid is int8 with zero point 0 (only its step
    learned, and it did), every weight grid [-127, 127]."""
    qmodel = trained
    before = _trained(steps=0)
    acts = {n: m for n, m in qmodel.named_modules() if isinstance(m, ActFakeQuant)}
    assert acts and all(m.quant_range.tolist() == [-128, 127] for m in acts.values())
    assert all(float(m.zero_point.abs().max()) == 0 for m in acts.values())
    assert not any(p.requires_grad for m in acts.values() for n, p in m.named_parameters() if "zero_point" in n)
    moved = [n for n, m in acts.items() if float(m.scale.detach()) != float(before.get_submodule(n).scale.detach())]
    assert moved, "LSQ should have moved the activation steps"
    weights = [m for m in qmodel.modules() if isinstance(m, WeightFakeQuant)]
    assert {(m.quant_min, m.quant_max) for m in weights} == {(-127, 127)}
    lowered = repq_fx.lower(qmodel)
    layers = [m for m in lowered.modules() if hasattr(m, "weight_container")]
    assert len(layers) == 7 and all(int(m.weight.min()) >= -127 for m in layers)


def test_residual_add_gets_its_input_quantized_and_the_conv_output_none() -> None:
    """The conv that feeds an add has no output quantizer; the add's other input is on a grid: the block
    input's existing quantizer (identity shortcut), the shortcut conv's output quantizer (strided one)."""
    qmodel = repq_fx.prepare(ResNetLike(), TRT)
    adds = [n for n in qmodel.graph.nodes if n.op == "call_function" and n.target.__name__ == "add"]
    assert len(adds) == 2
    quantizers = [[a for a in add.args if a.op == "call_module"
                   and isinstance(qmodel.get_submodule(a.target), ActFakeQuant)] for add in adds]
    convs = [[a for a in add.args if a.op == "call_function" and a.target in (torch.conv2d,
                                                                                nn.functional.conv2d)] for add in adds]
    assert [len(q) for q in quantizers] == [1, 1] and [len(c) for c in convs] == [1, 1]
    assert quantizers[0][0].target == "stem.output_fake_quant"  # shared with a1's input: one Q/DQ for both
    assert quantizers[1][0].target == "down.output_fake_quant"
    assert not any(n.endswith(("a2.output_fake_quant", "b2.output_fake_quant")) for n, _ in qmodel.named_modules())


def test_models_without_residual_adds_get_the_same_quantizers() -> None:
    names = [sorted(n for n, m in repq_fx.prepare(_plain(), c).named_modules() if isinstance(m, ActFakeQuant))
             for c in (TRT, repq_fx.QConfig())]
    assert names[0] == names[1]


def test_export_passes_the_tensorrt_check_and_onnx_runtime_layer_by_layer(exported: tuple) -> None:
    path, lowered, model = exported
    assert check_tensorrt_qdq(model) == []
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q and all(len(n.input) == 3 for n in q)
    segments = segment_parity(path, lowered, (torch.randn(8, 3, 12, 12),))
    layers = [s for s in segments if s.layers]
    assert len(layers) == 7 and all(s.ok for s in segments), [str(s) for s in segments]
    assert all(s.max_steps <= 1.001 for s in layers)


def test_extreme_int8_values_are_exact_in_onnx_runtime(tmp_path: Path) -> None:
    """Inputs at +-127 times weights at +-127: ONNX Runtime, keeping int8 signed, computes them exactly
    (rewritten to uint8 with zero point 128, as it does by default on x86, its u8s8 kernels saturate
    there without VNNI: 255 * 127 * 2 > 32767)."""
    torch.manual_seed(0)
    qmodel = repq_fx.prepare(nn.Sequential(nn.Conv2d(16, 4, 3)), TRT)  # conv -> Q: ORT's QLinearConv
    signs = torch.randint(0, 2, (8, 16, 5, 5)).float() * 2 - 1
    x = torch.cat([torch.ones(2, 16, 5, 5), signs])  # on the grid at +-127 (step 1 / 127)
    with torch.no_grad():
        weight = qmodel.get_parameter("0.weight")
        weight.copy_(torch.randint(0, 2, weight.shape).float() * 2 - 1)
        weight[0] = 1.0
    repq_fx.calibrate(qmodel, [x])
    lowered = repq_fx.lower(qmodel)
    assert int(lowered.get_submodule("quantized_conv").weight.abs().min()) == 127
    path = str(tmp_path / "extreme.onnx")
    repq_fx.export_onnx(lowered, (x[:1],), path)
    (segment,) = [s for s in segment_parity(path, lowered, (x,)) if s.layers]
    assert segment.max_steps <= 1.001, str(segment)


def _replace_input(model: onnx.ModelProto, node: onnx.NodeProto, old: str, new: str) -> None:
    node.input[list(node.input).index(old)] = new


def test_check_fails_on_files_tensorrt_cannot_fuse(exported: tuple) -> None:
    _, _, model = exported
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    # 1. the residual add reads the block input without its Q/DQ pair
    add = next(n for n in graph.node if n.op_type == "Add" and any(producer[i].op_type == "DequantizeLinear"
                                                                      for i in n.input))
    dq_name = next(i for i in add.input if producer[i].op_type == "DequantizeLinear")
    bare = producer[producer[dq_name].input[0]].input[0]  # what the QuantizeLinear reads
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    _replace_input(bad, next(n for n in bad.graph.node if n.output == add.output), dq_name, bare)
    assert any("without a Q/DQ pair" in p and repr(bare) in p for p in check_tensorrt_qdq(bad))
    # 2. a uint8 zero point of 128 on the model input's Q/DQ
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    q = next(n for n in bad.graph.node if n.op_type == "QuantizeLinear")
    zp = onnx.helper.make_tensor("uint8_zp", onnx.TensorProto.UINT8, [], [128])
    bad.graph.initializer.append(zp)
    for n in bad.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[2] == q.input[2]:
            n.input[2] = "uint8_zp"
    problems = check_tensorrt_qdq(bad)
    assert problems and all("uint8 128" in p for p in problems)
    # 3. a weight at -128
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    init = next(t for t in bad.graph.initializer if t.name.endswith("_deploy_weight"))
    values = onnx.numpy_helper.to_array(init).copy()
    values.reshape(-1)[0] = -128
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    assert any("holds -128" in p for p in check_tensorrt_qdq(bad))


def test_an_onnx_runtime_file_is_not_a_tensorrt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same network prepared for ONNX Runtime: uint8 activations, and its conv output quantized before
    the add. The check names both; `export --check` under "tensorrt" refuses such a file."""
    lowered = repq_fx.lower(_trained(repq_fx.QConfig(), steps=0))
    model = repq_fx.export_onnx(lowered, (torch.randn(1, 3, 12, 12),), str(tmp_path / "ort.onnx"))
    problems = check_tensorrt_qdq(model)
    assert any("zero point" in p and "uint8" in p for p in problems)
    assert any("quantized before the add" in p for p in problems)
    assert deploying._check_file(str(tmp_path / "ort.onnx"), lowered, torch.randn(2, 3, 12, 12), "tensorrt") == 1
    assert "does not have the form target 'tensorrt' runs in int8" in capsys.readouterr().err


def test_summary_says_the_sign_bit_is_wasted_after_relu() -> None:
    summary = get_target("tensorrt").summary
    assert "[-128, 127]" in summary and "sign bit" in summary and "[-127, 127]" in summary


def test_cli_trains_and_exports_for_tensorrt(fake_fmnist: Path, small_repvgg: None,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    spec, ckpt, out = "repq_fx.testing.blocks:RepVGGNet", fake_fmnist / "trt.pt", fake_fmnist / "trt.onnx"
    assert cli.main(["train", spec, "--method", "repq-bn", "--target", "tensorrt", "--epochs", "1", "--subset", "64",
                     "--test-subset", "20", "--batch-size", "32", "--calib-batches", "1", "--out", str(ckpt),
                     "--no-progress"]) == 0
    assert cli.main(["export", spec, "--ckpt", str(ckpt), "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "target tensorrt" in printed and "has the Q/DQ form target 'tensorrt' runs in int8" in printed
    zero_points = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8 and not t.dims]
    assert zero_points and all(int(z) == 0 for z in zero_points)
    assert check_tensorrt_qdq(onnx.load(str(out))) == []


def test_engine_benchmark_imports_without_tensorrt(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/tensorrt_engine.py is for a GPU machine; its --dry-run (export and check at 224x224) takes
    minutes here, so this checks only that it imports without tensorrt and parses its options."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tensorrt_engine.py"
    spec = importlib.util.spec_from_file_location("tensorrt_engine", path)
    module = importlib.util.module_from_spec(spec)
    had_tensorrt = "tensorrt" in sys.modules
    spec.loader.exec_module(module)
    assert ("tensorrt" in sys.modules) == had_tensorrt  # imported lazily, after the dry-run point
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "--dry-run" in capsys.readouterr().out


@pytest.mark.parametrize("widths", [dict(act_bits=4), dict(first_last_bits=6)])
def test_activation_widths_tensorrt_cannot_run_are_refused_up_front(widths: dict) -> None:
    """Regression: act_bits < 8 trained, then failed the export's form check (a Clip after the Q)."""
    with pytest.raises(repq_fx.errors.ConfigError, match="8 bits only"):
        repq_fx.QConfig(target="tensorrt", **widths)
    assert repq_fx.QConfig(target="tensorrt", weight_bits=4).weight_bits == 4  # int8-stored 4-bit weights: fine
