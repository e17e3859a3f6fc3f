"""``repq-fx export`` and ``repq-fx demo`` on the small synthetic Fashion-MNIST of conftest.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from repq_fx.app import cli
from repq_fx.app.demo import DemoConfig, run_demo
from repq_fx.app.train import TrainConfig, run_training

ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("small_repvgg")


def _train(tmp: Path, method: str, **kw) -> Path:
    out = tmp / f"{method}.pt"
    config = TrainConfig(model="repq_fx.testing.blocks:RepVGGNet", method=method, epochs=1, batch_size=32,
                         calib_batches=2, seed=1, **kw)
    run_training(config, out, progress=False, log=lambda _: None)
    return out


def test_export_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    out = capsys.readouterr().out
    for word in ("--ckpt", "--check", "QLinearConv", "int32", "repq-fx export examples:RepVGGNet"):
        assert word in out


@pytest.mark.parametrize("bits", [(4, 4), (8, 8)])
def test_export_a_trained_repq_checkpoint(fake_fmnist: Path, capsys: pytest.CaptureFixture[str], bits) -> None:
    # a trained network: end to end too, ORT gives the lowered model's outputs (checked layer by layer)
    fp = _train(fake_fmnist, "fp")
    q = _train(fake_fmnist, "repq-bn", from_ckpt=str(fp), bits=bits)
    out = fake_fmnist / "q.onnx"
    assert cli.main(["export", "repq_fx.testing.blocks:RepVGGNet", "--ckpt", str(q), "--out", str(out),
                     "--check"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "7 int8 layers" in text and "6 QLinearConv" in text and "100.00 %" in text


def test_export_refuses_a_float_checkpoint(fake_fmnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp = _train(fake_fmnist, "fp")
    assert cli.main(["export", "repq_fx.testing.blocks:RepVGGNet", "--ckpt", str(fp), "--out",
                     str(fake_fmnist / "x.onnx")]) == 2
    assert "float (fp) checkpoint" in capsys.readouterr().err
    assert not (fake_fmnist / "x.onnx").exists()


def test_export_without_checkpoint_calibrates_on_random_data(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.onnx"
    assert cli.main(["export", "repq_fx.testing.blocks:RepVGGNet", "--input-size", "1x28x28", "--out", str(out),
                     "--check"]) == 0
    text = capsys.readouterr().out
    assert "random" in text and "6 QLinearConv" in text and "0 float Conv" in text


@pytest.mark.parametrize("fmt, suffix, runtime", [("pte", ".pte", "XNNPACK"), ("openvino", ".xml", "OpenVINO")])
def test_export_formats_of_a_trained_checkpoint(fake_fmnist: Path, capsys: pytest.CaptureFixture[str], fmt, suffix,
                                                runtime) -> None:
    # one trained model, each runtime's file, checked in that runtime against the lowered model
    pytest.importorskip("executorch" if fmt == "pte" else "openvino", reason=f"--format {fmt} needs its runtime")
    fp = _train(fake_fmnist, "fp")
    q = _train(fake_fmnist, "repq-bn", from_ckpt=str(fp))
    out = fake_fmnist / f"q{suffix}"
    assert cli.main(["export", "repq_fx.testing.blocks:RepVGGNet", "--ckpt", str(q), "--out", str(out),
                     "--check"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "7 int8 layers" in text and runtime in text and "100.00 %" in text, text
    if fmt == "pte":
        assert "XNNPACK runs 6 of 6 convs" in text
    else:
        assert (fake_fmnist / "q.bin").is_file() and "7 int8" in text


def test_export_refuses_an_unknown_suffix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "repq_fx.testing.blocks:RepVGGNet", "--input-size", "1x28x28", "--out",
                     str(tmp_path / "m.tflite")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell the format" in err and "--format onnx|pte|openvino" in err


def test_demo_runs_end_to_end(fake_fmnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("repq_fx.app.demo.MODEL", "repq_fx.testing.blocks:RepVGGNet")
    lines: list[str] = []
    figures = run_demo(DemoConfig(fp_epochs=1, qat_epochs=1, workdir=str(fake_fmnist / "demo"), latency_runs=5),
                       log=lines.append, progress=False)
    text = "\n".join(lines)
    assert "6 QLinearConv" in text and "0 float Conv" in text
    assert figures["argmax_agreement"] >= 99.0
    assert figures["ort_layers_ok"] == figures["ort_layers"] > 0  # every layer, on any CPU
    assert figures["fake_quant_agreement"] >= 99.0 and "same class as fake quant" in text
    assert abs(figures["ort_int8_top1"] - figures["lowered_top1"]) <= 1.0
    assert figures["ort_int8_ms"] > 0 and figures["ort_float_ms"] > 0
    from repq_fx.export.formats import FORMATS

    for fmt in (f for f in FORMATS.values() if f.name != "onnx" and f.available):  # one line per other runtime
        assert figures[f"{fmt.name}_agreement"] >= 99.0 and fmt.runtime in text, fmt.name
    if "pytorch_int8_agreement" in figures:  # PyTorch's own int8 (compile_int8) against the ONNX export's classes
        assert figures["pytorch_int8_agreement"] >= 99.0
    else:
        assert "int8 PyTorch (torch.compile): not run" in text
    # a second run reuses the finished checkpoints
    again = run_demo(DemoConfig(fp_epochs=1, qat_epochs=1, workdir=str(fake_fmnist / "demo"), latency_runs=5),
                     log=lines.append, progress=False)
    assert again["qat_top1"] == figures["qat_top1"]


def test_export_without_checkpoint_uses_the_example_networks_input_size(tmp_path: Path, capsys) -> None:
    """Without --ckpt and --input-size, export fed 3x224x224 into the 1-channel example network; it
    uses the example's own input size now, as ``bench`` does."""
    out = tmp_path / "m.onnx"
    assert cli.main(["export", "examples:RepVGGNet", "--out", str(out), "--calib-batches", "1"]) == 0
    assert "input 1x1x28x28" in capsys.readouterr().out and out.is_file()
