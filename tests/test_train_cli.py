"""``repq-fx train`` / ``eval`` and ``repq_fx.app.train``: help, tiny runs, exact resume, checkpoints.

Runs use a small synthetic Fashion-MNIST written as IDX files (class k: a bright bar at row
2k + 4, over noise), found through ``$REPQ_FASHION_MNIST``, so they need no package; one
test uses the real data and skips without it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from repq_fx.app import cli
from repq_fx.app.data import fashion_mnist as fm
from repq_fx.errors import CheckpointError, RepQError
from repq_fx.app.train import (CHECKPOINT_FORMAT, TrainConfig, cosine_schedule, load_checkpoint, make_optimizer,
                               parse_bits, restore, run_training, save_checkpoint)

HAVE_FMNIST = (fm.DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file()


def _small(method: str = "fp", **kwargs) -> TrainConfig:
    """A small RepVGG (widths 8/16/32, one block per stage) on the synthetic data."""
    values = dict(model="repq_fx.testing.blocks:RepVGGNet", method=method, epochs=2, batch_size=32,
                  calib_batches=2, seed=3)
    values.update(kwargs)
    return TrainConfig(**values)


pytestmark = pytest.mark.usefixtures("small_repvgg")


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------
# Help and arguments.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("command, words", [
    ("train", ["--method", "repq-bn", "repq-bnest", "lsq", "ptq", "--bits", "--resume", "--from", "make data",
               "0.2860", "cosine", "fp.pt", "--compile"]),
    ("eval", ["--ckpt", "top-1", "PSNR"]),
])
def test_help_teaches(command: str, words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    missing = [w for w in words if w not in out]
    assert not missing, f"`repq-fx {command} --help` does not mention {missing}"


def test_top_level_help_lists_train_and_eval(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out and "explain" in out and "demo" in out


def test_parse_bits() -> None:
    assert parse_bits("4/8") == (4, 8) and parse_bits("w3a3") == (3, 3) and parse_bits("6") == (6, 6)
    for bad in ("4/9", "four", "4/4/4", "1/8"):
        with pytest.raises(RepQError):
            parse_bits(bad)


def test_bad_bits_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "examples:RepVGGNet", "--bits", "4/9", "--out", "x.pt"])
    assert exit_.value.code == 2 and "from 2 to 8" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Schedule and optimizer.
# ---------------------------------------------------------------------------

def test_cosine_schedule_per_step() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2, momentum=0.9)
    sched = cosine_schedule(opt, 10)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(11)]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_weight_decay_only_on_weights() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    opt = make_optimizer(model, TrainConfig(model="m:N", lr=0.1, weight_decay=5e-4))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    assert opt.param_groups[0]["weight_decay"] == 5e-4 and opt.param_groups[1]["weight_decay"] == 0.0
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


@pytest.mark.parametrize("optimizer, scale", [("sgd", 1.0), ("adam", 0.01)])
def test_lsq_steps_get_their_own_learning_rate(optimizer, scale) -> None:
    """Adam moves every parameter by ~lr per step, LSQ's gradient scale notwithstanding: at the
    weights' lr 1e-4, 8-bit steps of ~0.004 drifted and ECBSR W8A8 lost 0.027 dB in one QAT epoch."""
    import repq_fx

    qmodel = repq_fx.prepare(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)))
    opt = make_optimizer(qmodel, TrainConfig(model="m:N", method="repq-bn", lr=0.1, optimizer=optimizer))
    steps = [m.scale for m in qmodel.modules() if hasattr(m, "quant_range")]
    assert {id(p) for p in opt.param_groups[-1]["params"]} == {id(p) for p in steps}
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.1 * scale) and opt.param_groups[-1]["weight_decay"] == 0.0
    others = {id(p) for g in opt.param_groups[:-1] for p in g["params"]}
    assert others == {id(p) for p in qmodel.parameters()} - {id(p) for p in steps}


def test_defaults_by_data_and_method() -> None:
    fp = TrainConfig(model="m:N").resolved()
    assert (fp.lr, fp.weight_decay, fp.batch_size, fp.optimizer) == (0.05, 1e-4, 128, "sgd")
    q = TrainConfig(model="m:N", method="repq-bnest", bits=(4, 4)).resolved()
    assert (q.lr, q.weight_decay) == (0.01, 0.0) and q.qconfig().bn_mode == "estimate"
    assert TrainConfig(model="m:N", method="ptq").resolved().epochs == 0
    assert TrainConfig(model="m:N", method="ptq").qconfig().weight_quantizer == "minmax"
    sr = TrainConfig(model="m:N", data="sr").resolved()
    assert (sr.optimizer, sr.batch_size) == ("adam", 16)


# ---------------------------------------------------------------------------
# Tiny runs through the CLI.
# ---------------------------------------------------------------------------

def test_train_then_eval_then_quantize(fake_fmnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp, q = fake_fmnist / "fp.pt", fake_fmnist / "w4a4.pt"
    spec = "repq_fx.testing.blocks:RepVGGNet"
    assert cli.main(["train", spec, "--epochs", "1", "--subset", "200", "--batch-size", "32", "--out", str(fp),
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "top-1" in out and f"saved {fp}" in out
    ckpt = torch.load(fp, weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["epoch"] == 1
    assert ckpt["config"]["subset"] == 200 and ckpt["config"]["method"] == "fp"
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "epoch", "config", "metrics"}
    assert not [p for p in fake_fmnist.iterdir() if p.name.endswith(".tmp")]

    assert cli.main(["eval", spec, "--ckpt", str(fp), "--no-progress"]) == 0
    assert f"top-1 {ckpt['metrics']['top1']:.2f} %" in capsys.readouterr().out

    assert cli.main(["train", spec, "--method", "repq-bn", "--bits", "4/4", "--from", str(fp), "--epochs", "1",
                     "--subset", "200", "--batch-size", "32", "--calib-batches", "2", "--out", str(q),
                     "--no-progress"]) == 0
    model, qckpt = restore(q)
    assert isinstance(model, torch.fx.GraphModule) and qckpt["config"]["bits"] == [4, 4]
    assert cli.main(["eval", spec, "--ckpt", str(q), "--no-progress"]) == 0
    assert f"top-1 {qckpt['metrics']['top1']:.2f} %" in capsys.readouterr().out


def test_existing_output_needs_resume_or_overwrite(fake_fmnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = fake_fmnist / "run.pt"
    out.write_bytes(b"old")
    assert cli.main(["train", "examples:RepVGGNet", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"old"


# ---------------------------------------------------------------------------
# Resume.
# ---------------------------------------------------------------------------

class _Interrupt(Exception):
    pass


def _stop_after_first_epoch(line: str) -> None:
    if line.startswith("epoch 1/"):
        raise _Interrupt


@pytest.mark.parametrize("method", ["fp", "repq-bn"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(fake_fmnist: Path, method: str) -> None:
    config = _small(method, bits=(4, 4), subset=96, test_subset=20)
    straight, resumed = fake_fmnist / "straight.pt", fake_fmnist / "resumed.pt"
    if method != "fp":
        run_training(_small(subset=96, test_subset=20, epochs=1), fake_fmnist / "fp.pt", log=_quiet, progress=False)
        config.from_ckpt = str(fake_fmnist / "fp.pt")
    run_training(config, straight, log=_quiet, progress=False)
    with pytest.raises(_Interrupt):
        run_training(config, resumed, log=_stop_after_first_epoch, progress=False)
    assert load_checkpoint(resumed)["epoch"] == 1
    lines: list[str] = []
    run_training(config, resumed, resume=True, log=lines.append, progress=False)
    assert any("resuming" in line and "after epoch 1/2" in line for line in lines)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert b["epoch"] == 2 and a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"resumed run differs in {different[:5]}"
    assert a["metrics"]["history"] == [{**h, "seconds": a["metrics"]["history"][i]["seconds"]}
                                       for i, h in enumerate(b["metrics"]["history"])]


def test_a_float_checkpoint_from_before_targets_resumes(fake_fmnist: Path) -> None:
    """A float run has no integer grid: a float checkpoint written before targets existed (its config
    reads back as target onnxruntime-vnni) is the same run as today's float config, whose target is the
    default. benchmarks/accuracy.py resumes its float checkpoint this way before every QAT job."""
    path = fake_fmnist / "fp-old.pt"
    config = _small(subset=64, test_subset=20, epochs=1)
    run_training(config, path, log=_quiet, progress=False)
    ckpt = load_checkpoint(path)
    del ckpt["config"]["target"]  # what a checkpoint written before targets existed holds
    save_checkpoint(path, ckpt)
    assert TrainConfig.from_dict(load_checkpoint(path)["config"]).target == "onnxruntime-vnni"
    lines: list[str] = []
    run_training(config, path, resume=True, log=lines.append, progress=False)
    assert any("has finished all 1 epochs" in line for line in lines), lines


def test_a_quantized_run_of_another_target_does_not_resume(fake_fmnist: Path) -> None:
    """The target is the trained grid: a quantized checkpoint of another target is another run."""
    fp, path = fake_fmnist / "fp.pt", fake_fmnist / "q.pt"
    run_training(_small(subset=64, test_subset=20, epochs=1), fp, log=_quiet, progress=False)
    config = _small("ptq", subset=64, test_subset=20, from_ckpt=str(fp), target="onnxruntime-u8u8")
    run_training(config, path, log=_quiet, progress=False)
    with pytest.raises(CheckpointError, match="target: checkpoint 'onnxruntime-u8u8', now 'onnxruntime'"):
        run_training(dataclasses.replace(config, target="onnxruntime"), path, resume=True, log=_quiet,
                     progress=False)


def test_resume_a_finished_run_and_a_different_run(fake_fmnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = fake_fmnist / "run.pt"
    args = ["train", "repq_fx.testing.blocks:RepVGGNet", "--epochs", "1", "--subset", "64", "--batch-size", "32",
            "--test-subset", "20", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    assert cli.main(args + ["--resume"]) == 0
    assert "has finished all 1 epochs" in capsys.readouterr().out
    assert cli.main(args + ["--resume", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "lr: checkpoint 0.05, now 0.1" in err


# ---------------------------------------------------------------------------
# Damaged and mismatched checkpoints.
# ---------------------------------------------------------------------------

@pytest.fixture()
def good_ckpt(fake_fmnist: Path) -> Path:
    path = fake_fmnist / "good.pt"
    run_training(_small(subset=64, test_subset=20, epochs=1), path, log=_quiet, progress=False)
    return path


def _damage(good: Path, bad: Path, how: str) -> None:
    data = good.read_bytes()
    if how == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        bad.write_bytes(os.urandom(1000))
    elif how == "empty":
        bad.write_bytes(b"")
    elif how == "pickle":  # arbitrary objects are refused by weights_only=True
        bad.write_bytes(pickle.dumps(nn.ReLU()))
    elif how == "other-torch-file":
        torch.save({"state_dict": {}}, bad)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "pickle", "other-torch-file"])
def test_damaged_checkpoint_is_one_clear_line(good_ckpt: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = good_ckpt.with_name(f"{how}.pt")
    _damage(good_ckpt, bad, how)
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(bad)
    assert cli.main(["eval", "repq_fx.testing.blocks:RepVGGNet", "--ckpt", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "damaged" in err or "not a `repq-fx train` checkpoint" in err
    assert cli.main(["train", "repq_fx.testing.blocks:RepVGGNet", "--out", str(bad), "--resume",
                     "--no-progress"]) == 2


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["eval", "examples:RepVGGNet", "--ckpt", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_checkpoint_of_another_model(good_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["eval", "examples:QARepVGGNet", "--ckpt", str(good_ckpt), "--no-progress"]) == 2
    assert "was trained with model 'repq_fx.testing.blocks:RepVGGNet'" in capsys.readouterr().err
    # A checkpoint whose weights do not fit the model its config names.
    ckpt = torch.load(good_ckpt, weights_only=True)
    ckpt["model"] = {k: v for k, v in list(ckpt["model"].items())[:-1]}
    ckpt["model"]["stages.0.0.rbr_dense.conv.weight"] = torch.zeros(3, 3)
    save_checkpoint(good_ckpt, ckpt)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        restore(good_ckpt)


def test_from_must_be_a_float_checkpoint(good_ckpt: Path, fake_fmnist: Path) -> None:
    q = fake_fmnist / "q.pt"
    run_training(_small("ptq", from_ckpt=str(good_ckpt), subset=64, test_subset=20), q, log=_quiet, progress=False)
    assert load_checkpoint(q)["epoch"] == 0
    with pytest.raises(CheckpointError, match="must be a float"):
        run_training(_small("lsq", from_ckpt=str(q), subset=64), fake_fmnist / "x.pt", log=_quiet, progress=False)


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"epoch": 2, "bad": lambda: None})  # cannot be pickled: fails mid-write
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# ---------------------------------------------------------------------------
# Real data.
# ---------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed; `make data`")
def test_real_fashion_mnist_learns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    metrics = run_training(_small(subset=512, test_subset=1000, epochs=3, batch_size=32), tmp_path / "fp.pt",
                           log=_quiet, progress=False)
    assert metrics["top1"] > 30  # chance is 10 %; 45-52 % over seeds 0-4


def test_sr_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("skimage")
    out = tmp_path / "sr.pt"
    assert cli.main(["train", "examples:ECBSR", "--epochs", "1", "--subset", "32", "--batch-size", "16",
                     "--test-subset", "1", "--out", str(out), "--no-progress"]) == 0
    assert "PSNR" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    assert ckpt["config"]["data"] == "sr" and 10 < ckpt["metrics"]["psnr"] < 60


def test_missing_dataset_is_one_line_with_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "nowhere"))
    assert cli.main(["train", "examples:RepVGGNet", "--out", str(tmp_path / "x.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "apt-get install dataset-fashion-mnist" in err


def test_example_network_and_data_must_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "examples:ECBSR", "--data", "fashion-mnist", "--out", str(tmp_path / "x.pt")]) == 2
    assert "super-resolution network" in capsys.readouterr().err
    assert cli.main(["train", "examples:RepVGGNet", "--data", "sr", "--out", str(tmp_path / "x.pt")]) == 2
    assert "classification network" in capsys.readouterr().err


@pytest.mark.needs_cxx
@pytest.mark.parametrize("method", ["fp", "repq-bnest"])
def test_compiled_training_trains_the_same_model(fake_fmnist: Path, method: str) -> None:
    # --compile changes the speed, not the run: the same steps on the same batches, so the same
    # weights up to float rounding (fused kernels round differently). Float: one SGD step (32 images,
    # batch 32), whose update differs by rounding only (gradients measured within 5e-6 of eager, in
    # norm); over more steps the training dynamics of this tiny net amplify rounding ~1000x, by an
    # amount that depends on the CPU's kernels. RepQ-BNEst at 8 bits: a rounding difference can move a
    # value across a quantizer's rounding boundary, so its loss is compared rather than every weight.
    config = _small(method, subset=32 if method == "fp" else 64, test_subset=20, epochs=1)
    eager, compiled = fake_fmnist / f"{method}-eager.pt", fake_fmnist / f"{method}-compiled.pt"
    lines: list[str] = []
    got = run_training(config, compiled, log=lines.append, progress=False, compile=True)
    expected = run_training(config, eager, log=_quiet, progress=False)
    assert any("compiled with repq_fx.compile" in line for line in lines)
    assert math.isclose(got["loss"], expected["loss"], rel_tol=1e-3)
    a, b = load_checkpoint(compiled)["model"], load_checkpoint(eager)["model"]
    assert a.keys() == b.keys()
    if method == "fp":
        start = fake_fmnist / "fp-start.pt"
        run_training(dataclasses.replace(config, epochs=0), start, log=_quiet, progress=False)
        init = load_checkpoint(start)["model"]
        trained = [k for k in a if a[k].is_floating_point() and "running" not in k and not torch.equal(b[k], init[k])]
        assert trained
        far = [k for k in trained if float((a[k] - b[k]).norm()) > 1e-4 * float((b[k] - init[k]).norm())]
        assert not far, far[:5]


# ---------------------------------------------------------------------------
# Errors a user meets.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--subset", "0"), ("--test-subset", "-3"), ("--batch-size", "0"),
                                           ("--calib-batches", "0"), ("--epochs", "-1")])
def test_counts_below_their_minimum_are_usage_errors(option: str, value: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``train --subset 0`` ended in a raw ValueError from the sampler."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "examples:RepVGGNet", option, value, "--out", str(tmp_path / "x.pt"), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert option in err and f"'{value}' is not a whole number >=" in err


def test_bits_with_float_training_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--method fp --bits 4/4`` trained a float model and ignored the bits without a word."""
    out = tmp_path / "x.pt"
    assert cli.main(["train", "examples:RepVGGNet", "--bits", "4/4", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--bits 4/4 does nothing with --method fp" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_timm_and_torchvision_specs_are_fitted_to_fashion_mnist() -> None:
    """A timm/torchvision spec trained on Fashion-MNIST kept its 1000-class (and 3-channel) model."""
    from repq_fx.app.train import data_note, float_model
    from repq_fx.app.train.model import _channel_adapter

    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    timm_model = float_model(TrainConfig(model="timm:resnet10t"))
    assert timm_model.get_classifier().out_features == 10 and timm_model.conv1[0].in_channels == 1
    assert _channel_adapter(TrainConfig(model="timm:resnet10t")) is None
    assert "num_classes=10, in_chans=1" in data_note(TrainConfig(model="timm:resnet10t"))
    tv_model = float_model(TrainConfig(model="torchvision:resnet18"))
    assert tv_model.fc.out_features == 10
    adapter = _channel_adapter(TrainConfig(model="torchvision:resnet18"))
    assert adapter(torch.zeros(2, 1, 28, 28)).shape == (2, 3, 28, 28)
    # a run written before fit_data existed rebuilds the model it trained
    legacy = TrainConfig.from_dict({"model": "timm:resnet10t"})
    assert not legacy.fit_data and float_model(legacy).get_classifier().out_features == 1000


@pytest.mark.parametrize("spec, says", [
    ("torchvision.models:resnet18", r"maps a batch of 2 Fashion-MNIST images to \[2, 1000\], not \[2, 10\] logits"),
    ("timm:vit_tiny_patch16_224", r"cannot run on Fashion-MNIST's 1x28x28 images"),
])
def test_a_model_that_cannot_fit_fashion_mnist_is_refused_clearly(spec: str, says: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip(spec.partition(":")[0].partition(".")[0])
    out = tmp_path / "x.pt"
    assert cli.main(["train", spec, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(says, err), err
    assert not out.exists()


def test_timm_spec_trains_on_fashion_mnist(fake_fmnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    out = fake_fmnist / "timm.pt"
    assert cli.main(["train", "timm:resnet10t", "--epochs", "1", "--subset", "64", "--test-subset", "50",
                     "--batch-size", "32", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "note: timm:resnet10t built with num_classes=10, in_chans=1 for Fashion-MNIST" in text
    model, ckpt = restore(out)
    assert ckpt["config"]["fit_data"] is True and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_train_shows_progress_while_calibrating_and_evaluating(fake_fmnist: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``train`` calibrated and evaluated 10k test images with no progress shown."""
    tqdm = pytest.importorskip("tqdm")
    shown: list[tuple[str, int | None]] = []

    class Recording(tqdm.tqdm):  # every progress bar of the run
        def __init__(self, *args, **kwargs):
            shown.append((kwargs.get("desc"), kwargs.get("total")))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    run_training(_small("repq-bn", epochs=1, subset=64, test_subset=40), fake_fmnist / "q.pt", progress=True,
                 log=_quiet)
    descs = [d for d, _ in shown]
    assert ("calibrate", 2) in shown and descs.count("eval") == 1 and "epoch 1/1" in descs
    assert descs.index("calibrate") < descs.index("epoch 1/1") < descs.index("eval")
