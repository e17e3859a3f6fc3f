"""The ``repq-fx`` command line (``repq_fx.cli``) and the model specs it reads (``repq_fx.models``)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from repq_fx import cli, models
from repq_fx.examples.blocks import RepVGGNet
from repq_fx.models import ModelSpecError, resolve_model


def test_help_lists_commands_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("explain", "merge", "demo", "examples:", "timm:NAME"):
        assert word in out


def test_explain_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain", "examples:RepVGGNet", "--input-size", "1x28x28"]) == 0
    out = capsys.readouterr().out
    assert "merged" in out
    assert "RepVGGNet: 9 of 9 blocks merged" in out


def test_merge_check_and_save(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "merged.pt"
    assert cli.main(["merge", "examples:RepVGGNet", "--input-size", "1x28x28", "--check", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert "convs 18 -> 9" in out and " ok" in out
    merged = torch.load(path, weights_only=False)
    x = torch.randn(2, 1, 28, 28)
    assert merged(x).shape == (2, 10)


def test_bad_spec_is_one_line_without_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "repq_fx.cli", "explain", "no-such-spec"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no-such-spec" in lines[0] and "accepted forms" in lines[0]


@pytest.mark.parametrize("spec", ["timm:no_such_model", "examples:NoSuchNet", "no_such_module:Net"])
def test_unknown_model_is_one_line(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    assert cli.main(["explain", spec]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and spec in err and "accepted forms" in err


def test_bad_input_size_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["explain", "examples:RepVGGNet", "--input-size", "28by28"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("spec, cls_name, module", [
    ("timm:repvgg_a0", "ByobNet", "timm"),
    ("torchvision:resnet18", "ResNet", "torchvision"),
    ("examples:RepVGGNet", "RepVGGNet", None),
    ("repq_fx.examples.blocks:RepVGGNet", "RepVGGNet", None),
    ("torch.nn:Identity", "Identity", None),
])
def test_resolve_model_each_form(spec: str, cls_name: str, module: str | None) -> None:
    if module:
        pytest.importorskip(module)
    model = resolve_model(spec)
    assert isinstance(model, nn.Module) and type(model).__name__ == cls_name


@pytest.mark.parametrize("spec, says", [
    ("RepVGGNet", "expected PREFIX:NAME"),
    ("examples:", "expected PREFIX:NAME"),
    (":RepVGGNet", "expected PREFIX:NAME"),
    ("examples:RepVGGBlock", "cannot be built without arguments"),
    ("examples:RepVGGNetz", "did you mean RepVGGNet"),
    ("torch.nn:NoSuchLayer", "has no attribute"),
    ("torch:float32", "not a model class or factory"),
])
def test_resolve_model_errors_name_the_problem(spec: str, says: str) -> None:
    with pytest.raises(ModelSpecError, match="accepted forms") as error:
        resolve_model(spec)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_resolve_model_registry_is_extensible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.RESOLVERS, "mine", lambda name: RepVGGNet(num_classes=int(name)))
    assert resolve_model("mine:3").linear.out_features == 3
