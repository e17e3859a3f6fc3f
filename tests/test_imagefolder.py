"""``repq-fx train --data imagefolder:DIR`` / ``srfolder:DIR``: the user's own images.

A tiny ImageFolder is written as 16x16 PNGs in a temporary folder: three classes of coloured
patterns over noise (red horizontal stripes, green vertical stripes, blue checks), 12 training
and 4 val images each, which a small RepVGG learns in a few epochs. Runs go through the command
line entry (``repq_fx.app.cli.main``); bad folders and images must be one line naming the path.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import repq_fx
from repq_fx.app import cli
from repq_fx.app.data.imagefolder import image_folder_split, image_loader
from repq_fx.app.train import TrainConfig, evaluate_classifier, float_model, load_checkpoint, make_datasets, \
    make_test_loader, restore, run_training

CLASSES = ("checks", "horizontal", "vertical")


def _pattern(name: str, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    x = rng.integers(0, 70, (size, size, 3)).astype(np.uint8)
    if name == "horizontal":
        x[::4, :, 0] = x[1::4, :, 0] = 255
    elif name == "vertical":
        x[:, ::4, 1] = x[:, 1::4, 1] = 255
    else:
        x[(np.add.outer(np.arange(size), np.arange(size)) // 4) % 2 == 0, 2] = 255
    return x


def write_image_folder(root: Path, train: int = 12, val: int = 4, classes: tuple[str, ...] = CLASSES) -> Path:
    """``root/train/CLASS/i.png`` and ``root/val/CLASS/i.png``, deterministic."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_pattern(name, rng)).save(root / split / name / f"{i}.png")
    return root


def _train(root: Path, out: Path, *extra: str, model: str = "examples:RepVGGNet", size: str = "16") -> int:
    return cli.main(["train", model, "--data", f"imagefolder:{root}", "--input-size", size, "--batch-size", "12",
                     "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The folder, a float run of examples:RepVGGNet (3 epochs) and a W8A8 RepQ-BN run from it (1 epoch,
    2 workers)."""
    tmp = tmp_path_factory.mktemp("imagefolder")
    root, fp, q = write_image_folder(tmp / "shapes"), tmp / "fp.pt", tmp / "w8a8.pt"
    assert _train(root, fp, "--epochs", "3") == 0
    assert _train(root, q, "--method", "repq-bn", "--from", str(fp), "--epochs", "1", "--workers", "2") == 0
    return {"root": root, "fp": fp, "q": q}


# ---------------------------------------------------------------------------
# Training, checkpoints, evaluation.
# ---------------------------------------------------------------------------

def test_example_network_learns_the_folder_and_its_checkpoint_lowers(trained: dict[str, Path]) -> None:
    fp = load_checkpoint(trained["fp"])
    assert fp["config"]["classes"] == list(CLASSES) and fp["config"]["input_size"] == [3, 16, 16]
    assert fp["config"]["data"] == f"imagefolder:{trained['root']}"
    assert fp["metrics"]["top1"] > 60.0, fp["metrics"]  # chance is 33.3 %
    model, ckpt = restore(trained["q"])
    assert isinstance(model, torch.fx.GraphModule) and ckpt["config"]["method"] == "repq-bn"
    saved = TrainConfig.from_dict(ckpt["config"])
    lowered = repq_fx.lower(model)
    assert lowered.lowered_layers == 10  # 9 RepVGG blocks, one conv each, and the classifier
    loader = make_test_loader(saved)
    x, _ = next(iter(loader))
    assert x.shape == (12, 3, 16, 16)
    with torch.no_grad():
        agree = (lowered(x).argmax(1) == model(x).argmax(1)).sum().item()
    assert agree >= 11, f"the lowered model agrees with the fake-quant one on {agree} of 12 val images"
    assert evaluate_classifier(model, loader) == pytest.approx(ckpt["metrics"]["top1"])


def test_eval_reads_the_val_split_of_the_same_or_another_folder(trained: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    top1 = load_checkpoint(trained["fp"])["metrics"]["top1"]
    assert cli.main(["eval", "examples:RepVGGNet", "--ckpt", str(trained["fp"]), "--no-progress"]) == 0
    assert f"top-1 {top1:.2f} %" in capsys.readouterr().out
    other = tmp_path / "copy"
    shutil.copytree(trained["root"] / "val", other / "val")  # eval needs no train/
    assert cli.main(["eval", "examples:RepVGGNet", "--ckpt", str(trained["fp"]), "--data", f"imagefolder:{other}",
                     "--workers", "2", "--no-progress"]) == 0
    assert f"top-1 {top1:.2f} %" in capsys.readouterr().out
    (other / "val" / "zebra").mkdir()
    assert cli.main(["eval", "examples:RepVGGNet", "--ckpt", str(trained["fp"]), "--data", f"imagefolder:{other}",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{other / 'val' / 'zebra'} is a class that the training classes (checks, horizontal, vertical) lack" in err
    assert cli.main(["eval", "examples:RepVGGNet", "--ckpt", str(trained["fp"]), "--data", "fashion-mnist",
                     "--no-progress"]) == 2
    assert "was trained with data" in capsys.readouterr().err


# quantizing a randomly initialised timm model for 3 steps: some of the stem's learned weight steps collapse,
# which lower() warns about; the test is about the model's shape, not its accuracy
@pytest.mark.filterwarnings("ignore::repq_fx.errors.StepCollapsedWarning")
def test_timm_model_is_built_with_the_data_classes_and_channels(trained: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    out = tmp_path / "timm.pt"
    assert _train(trained["root"], out, "--method", "repq-bn", "--epochs", "1", "--calib-batches", "2",
                  model="timm:repvgg_a0", size="32") == 0
    text = capsys.readouterr().out
    assert ("note: timm:repvgg_a0 built with num_classes=3, in_chans=3 for imagefolder:"
            f"{trained['root']} (classes: checks, horizontal, vertical)") in text
    model, _ = restore(out)
    lowered = repq_fx.lower(model)
    assert lowered(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    grey = TrainConfig(model="timm:repvgg_a0", data=f"imagefolder:{trained['root']}", input_size=(1, 32, 32))
    assert float_model(grey).stem.conv_kxk.conv.in_channels == 1


def test_grey_input_size_reads_grey_images_for_a_grey_model(trained: dict[str, Path]) -> None:
    config = TrainConfig(model="examples:RepVGGNet", data=f"imagefolder:{trained['root']}", input_size=(1, 20, 12))
    train, val = make_datasets(config)
    assert train[0][0].shape == (1, 20, 12) and val[0][0].shape == (1, 20, 12)
    net = float_model(config)
    assert net.stages[0][0].in_channels == 1 and net.linear.out_features == 3
    few = TrainConfig(**{**config.to_dict(), "subset": 5, "test_subset": 2})
    assert [len(d) for d in make_datasets(few)] == [5, 2]


def test_resume_is_exact_whatever_the_number_of_workers(tmp_path: Path) -> None:
    """Augmentation is seeded per image, so a run resumed with 2 workers ends like one read in-process."""
    root = write_image_folder(tmp_path / "shapes", train=4, val=2)
    config = TrainConfig(model="examples:RepVGGNet", data=f"imagefolder:{root}", input_size=(3, 16, 16), epochs=2,
                         batch_size=6)
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    run_training(config, straight, progress=False, log=lambda _: None)

    def stop(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(config, resumed, progress=False, log=stop)
    run_training(TrainConfig(**{**config.to_dict(), "workers": 2}), resumed, resume=True, progress=False,
                 log=lambda _: None)
    a, b = load_checkpoint(straight)["model"], load_checkpoint(resumed)["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_training_set_takes_a_distributed_sampler(trained: dict[str, Path]) -> None:
    """Datasets are built apart from loaders, so DDP can give the training set its own sampler."""
    from torch.utils.data.distributed import DistributedSampler

    train, _ = make_datasets(TrainConfig(model="examples:RepVGGNet", data=f"imagefolder:{trained['root']}",
                                         input_size=(3, 16, 16)))
    halves = [image_loader(train, 8, shuffle=True, sampler=DistributedSampler(train, num_replicas=2, rank=r, seed=1))
              for r in (0, 1)]
    assert [sum(len(y) for _, y in loader) for loader in halves] == [18, 18]
    x0, x1 = train[5][0], train[5][0]
    train.set_epoch(1)
    assert torch.equal(x0, x1) and not torch.equal(x0, train[5][0])  # same draw per (epoch, image), new each epoch


def test_mixed_grey_rgba_and_palette_images_are_read_as_rgb(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "mixed", train=2, val=1)
    image = Image.open(root / "train" / "checks" / "0.png")
    image.convert("L").save(root / "train" / "checks" / "0.png")
    image.convert("RGBA").save(root / "train" / "horizontal" / "0.png")
    image.convert("P").save(root / "val" / "vertical" / "0.png")
    train = image_folder_split(root, "train", CLASSES, (3, 16, 16), train=True, seed=0)
    val = image_folder_split(root, "val", CLASSES, (3, 16, 16), train=False)
    assert {tuple(x.shape) for x, _ in [*train, *val]} == {(3, 16, 16)}


# ---------------------------------------------------------------------------
# Bad data: one line naming the file or folder, exit status 2, no checkpoint.
# ---------------------------------------------------------------------------

def _remove_class_folders(root: Path) -> Path:
    for c in CLASSES:
        for p in (root / "train" / c).iterdir():
            p.rename(root / "train" / f"{c}-{p.name}")
        (root / "train" / c).rmdir()
    return root / "train"


BAD_FOLDERS = {
    "missing folder": (lambda root: shutil.rmtree(root) or root, "does not exist"),
    "empty folder": (lambda root: [shutil.rmtree(root), root.mkdir()] and root / "train", "does not exist"),
    "no class folders": (_remove_class_folders, "holds images (checks-0.png, ...) but no class sub-folders"),
    "empty class folder": (lambda root: [p.unlink() for p in (root / "train" / "vertical").iterdir()]
                           and root / "train" / "vertical", "holds no images"),
    "missing val": (lambda root: shutil.rmtree(root / "val") or root / "val", "does not exist"),
    "one class": (lambda root: [shutil.rmtree(root / "train" / c) for c in CLASSES[1:]] and root / "train",
                  "has one class folder (checks); a classifier needs two or more"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_is_one_line_naming_it(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_image_folder(tmp_path / "data", train=2, val=1)
    damage, says = BAD_FOLDERS[case]
    named = damage(root)
    out = tmp_path / "x.pt"
    assert _train(root, out, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("repq-fx: error: "), err
    assert f"{named} {says}" in err, err
    assert not out.exists()


@pytest.mark.parametrize("split, workers", [("train", "2"), ("val", "0")])
def test_corrupt_image_is_one_line_naming_the_file(split: str, workers: str, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """A truncated PNG (its header reads fine) in train/ read by 2 worker processes, or a file that is no
    image at all in val/: the worker's traceback must not reach the user."""
    root = write_image_folder(tmp_path / "data", train=3, val=1)
    bad = root / split / "vertical" / "0.png"
    bad.write_bytes(bad.read_bytes()[:120] if split == "train" else b"not an image")
    assert _train(root, tmp_path / "x.pt", "--epochs", "1", "--workers", workers) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert f"repq-fx: error: cannot read the image {bad} (" in err


def test_a_model_that_cannot_take_the_data_is_refused(trained: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A model built without arguments keeps its head and its input channels."""
    out = tmp_path / "x.pt"
    assert _train(trained["root"], out, model="repq_fx.testing.blocks:RepVGGNet") == 2
    assert ("repq_fx.testing.blocks:RepVGGNet's first conv takes 1 channel; the images of imagefolder:"
            f"{trained['root']} have 3: pass --input-size 1xHxW") in capsys.readouterr().err
    assert _train(trained["root"], out, model="repq_fx.testing.blocks:RepVGGNet", size="1x16x16") == 2
    assert "to [2, 10], not [2, 3] logits" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args, says", [
    (["--input-size", "16"], "input_size (--input-size) sets the image size of imagefolder data"),
    (["--workers", "2"], "workers (--workers) are for data read from files"),
    (["--data", "imagefolder:d", "--input-size", "4x16x16"], "C = 1 (grey) or 3 (RGB)"),
])
def test_options_that_do_not_fit_the_data_are_refused(args: list[str], says: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "examples:RepVGGNet", *args, "--out", str(tmp_path / "x.pt")]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("data, says", [("imagefolder", "needs a folder: imagefolder:DIR"),
                                        ("sr:photos", "takes no folder"), ("folder:x", "data must be one of")])
def test_bad_data_spec_is_a_usage_error(data: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "examples:RepVGGNet", "--data", data, "--out", "x.pt"])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Super-resolution from a folder.
# ---------------------------------------------------------------------------

def _photo(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth random RGB image: low-frequency noise, upsampled."""
    small = torch.from_numpy(rng.random((1, 3, 6, 6), dtype=np.float32))
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic", align_corners=False)
    return Image.fromarray((big[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def test_srfolder_trains_ecbsr_and_names_a_too_small_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for split, n in (("train", 3), ("val", 2)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            _photo(rng, 72).save(root / split / f"{i}.png")
    out = tmp_path / "sr.pt"
    assert cli.main(["train", "examples:ECBSR", "--data", f"srfolder:{root}", "--epochs", "1", "--subset", "32",
                     "--workers", "2", "--out", str(out), "--no-progress"]) == 0
    assert "PSNR" in capsys.readouterr().out
    model, ckpt = restore(out)
    assert ckpt["metrics"]["psnr"] > 20 and model(torch.rand(1, 1, 8, 8)).shape == (1, 1, 16, 16)
    _photo(rng, 40).save(root / "train" / "small.png")
    assert cli.main(["train", "examples:ECBSR", "--data", f"srfolder:{root}", "--epochs", "1", "--subset", "32",
                     "--out", str(out), "--overwrite", "--no-progress"]) == 2
    assert (f"{root / 'train' / 'small.png'} is 40x40 pixels, smaller than one 64x64 training patch"
            in capsys.readouterr().err)
