"""The ``repq-fx`` command line (``repq_fx.app.cli``) and the model specs it reads (``repq_fx.app.models``)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from repq_fx.app import cli, models
from repq_fx.app.cli import merging
from repq_fx.testing.blocks import RepVGGNet
from repq_fx.app.models import ModelSpecError, resolve_model


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
    result = subprocess.run([sys.executable, "-m", "repq_fx", "explain", "no-such-spec"],
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
    ("repq_fx.testing.blocks:RepVGGNet", "RepVGGNet", None),
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


# ---------------------------------------------------------------------------
# Errors a user meets.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["explain", "merge", "export", "bench"])
def test_input_size_without_channels_is_one_short_line(command: str, tmp_path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``--input-size 28x28`` was accepted as a 2-d size and failed deep in the model: a traceback and
    a 2,400-character message. It is a usage error now, naming the format."""
    extra = ["--out", str(tmp_path / "m.onnx")] if command == "export" else []
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "examples:RepVGGNet", "--input-size", "28x28", *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'28x28' is not CxHxW" in err and "1x28x28" in err
    assert "Traceback" not in err and len(err) < 600


def _warned_prepare(wrapped: nn.Module, kind: str) -> torch.fx.GraphModule:
    import repq_fx

    with pytest.warns(UserWarning, match=rf"prepare\(\): the model is wrapped in {kind}; working on its "
                                         r".module \(RepVGGNet\).*wrap it in"):
        return repq_fx.prepare(wrapped)


def _same_prepared(qmodel: torch.fx.GraphModule, model: nn.Module) -> None:
    import repq_fx

    assert not any(k.startswith("module.") for k in qmodel.state_dict())
    reference = repq_fx.prepare(model)
    assert qmodel.state_dict().keys() == reference.state_dict().keys()
    repq_fx.disable_fake_quant(qmodel)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(qmodel.eval()(x), model.eval()(x), atol=1e-5)


def test_data_parallel_model_is_unwrapped_with_a_warning() -> None:
    """``prepare(nn.DataParallel(model))`` raised a CaptureError about an "input size 64" the user never
    gave (the export fallback tracing DataParallel's scatter); explain, merge and prepare now work on
    ``.module`` and say so."""
    import repq_fx

    torch.manual_seed(0)
    model = RepVGGNet()
    wrapped = nn.DataParallel(model)
    _same_prepared(_warned_prepare(wrapped, "DataParallel"), model)
    with pytest.warns(UserWarning, match="explain"):
        assert "9 of 9 blocks merged" in str(repq_fx.explain(wrapped))
    with pytest.warns(UserWarning, match="merge"):
        merged = repq_fx.merge(wrapped)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(merged(x), model.eval()(x), atol=1e-5)


def test_distributed_data_parallel_model_is_unwrapped_with_a_warning(tmp_path) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = RepVGGNet()
        wrapped = nn.parallel.DistributedDataParallel(model)
        _same_prepared(_warned_prepare(wrapped, "DistributedDataParallel"), model)
    finally:
        dist.destroy_process_group()


def test_timm_check_progress_is_labelled_timm_check(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The bar said "repq-fx demo" and stayed on screen after the table (printed twice)."""
    tqdm = pytest.importorskip("tqdm")
    pytest.importorskip("timm")
    bars: list[dict] = []

    class Recording(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    monkeypatch.setattr(merging, "_default_size", lambda model: (3, 32, 32))  # quick: a small input
    assert cli.main(["timm-check", "--models", "repvgg_a0"]) == 0
    assert [b.get("desc") for b in bars] == ["timm-check"] and bars[0].get("leave") is False
    assert "repq-fx demo" not in capsys.readouterr().err


@pytest.mark.parametrize("old, new", [("repq_fx.examples.networks:RepVGGNet", "repq_fx.app.networks:RepVGGNet"),
                                      ("repq_fx.examples.blocks:RepVGGNet", "repq_fx.testing.blocks:RepVGGNet")])
def test_model_specs_of_earlier_versions_still_resolve(old: str, new: str) -> None:
    """Regression: checkpoints name their model spec; those trained before the application moved named
    repq_fx.examples, and could then be neither evaluated nor exported."""
    from repq_fx.app.models import resolve_model

    assert type(resolve_model(old)) is type(resolve_model(new))
