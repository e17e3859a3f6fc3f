"""Data readers (``repq_fx.app.data``) checked against the formats and formulas they implement.

Fashion-MNIST readers run on small IDX files written here, so everything but the last
tests runs without the Debian package; those skip with the reason when it is missing.
"""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from repq_fx.app.data import fashion_mnist as fm
from repq_fx.app.data import sr
from repq_fx.errors import CorruptDataError, DataError, DatasetNotFoundError, RepQError

HAVE_FMNIST = all((fm.DEFAULT_ROOT / f"{p}-{k}-idx{d}-ubyte.gz").is_file()
                  for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason=f"Debian's dataset-fashion-mnist is not installed "
                                  f"(no IDX files in {fm.DEFAULT_ROOT}); `make data` installs it")


def _fake_fmnist(root: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> None:
    """Write the four IDX files of a tiny Fashion-MNIST: image k is filled with the value k."""
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1).expand(n, 28, 28).contiguous()
        fm.write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        fm.write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", (torch.arange(n) % 10).to(torch.uint8))


# ---------------------------------------------------------------------------
# IDX.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_round_trip(tmp_path: Path, dtype: torch.dtype, gz: bool) -> None:
    t = (torch.randn(3, 4, 5) * 50).to(dtype)
    path = tmp_path / ("t.idx.gz" if gz else "t.idx")
    fm.write_idx(path, t)
    got = fm.read_idx(path)
    assert got.dtype == dtype and torch.equal(got, t)


def test_idx_is_big_endian_by_the_spec(tmp_path: Path) -> None:
    # Hand-written: type 0x0B (int16), 1 dimension of size 2, values 0x0102 = 258 and 0xFFFE = -2.
    raw = bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE])
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "b.gz").write_bytes(gzip.compress(raw))  # gzip is recognised by content, not by name
    (tmp_path / "c").write_bytes(gzip.compress(raw))
    for name in ("a", "b.gz", "c"):
        assert fm.read_idx(tmp_path / name).tolist() == [258, -2]


@pytest.mark.parametrize("raw, says", [
    (b"", "first two bytes"),
    (bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]), "first two bytes"),
    (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7]), "unknown element type 0x42"),
    (bytes([0, 0, 8, 0]), "zero dimensions"),
    (bytes([0, 0, 8, 3, 0, 0, 0, 1]), "header"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 7]), "needs 3 bytes of data, the file has 2"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 1, 7, 7]), "needs 1 bytes of data, the file has 2"),
    (b"\x1f\x8b not really gzip", "gzip"),
    (gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1]), mtime=0)[:-6], "gzip"),  # mtime=0: the same id on every xdist worker
])
def test_corrupt_idx_raises_a_clear_error(tmp_path: Path, raw: bytes, says: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(raw)
    with pytest.raises(CorruptDataError, match=says) as error:
        fm.read_idx(path)
    message = str(error.value)
    assert str(path) in message and "apt-get install dataset-fashion-mnist" in message
    assert isinstance(error.value, DataError) and isinstance(error.value, RepQError)


def test_missing_idx_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        fm.read_idx(tmp_path / "nothing")


# ---------------------------------------------------------------------------
# Fashion-MNIST loading.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_load_from_idx_files(tmp_path: Path, gz: bool) -> None:
    _fake_fmnist(tmp_path, gz=gz)
    images, labels = fm.load_fashion_mnist("train", tmp_path)
    assert images.shape == (20, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [k % 10 for k in range(20)]
    assert torch.equal(images[:, 5, 7], torch.arange(20, dtype=torch.uint8))
    assert fm.load_fashion_mnist("test", tmp_path)[0].shape == (10, 28, 28)


def test_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_fmnist(tmp_path)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    assert len(fm.FashionMNIST("test")) == 10


def test_missing_dataset_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as error:
        fm.load_fashion_mnist("train", tmp_path / "empty")
    message = str(error.value)
    assert "train-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message and "make data" in message
    assert isinstance(error.value, FileNotFoundError)


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("validation")


def test_images_and_labels_that_do_not_belong_together(tmp_path: Path) -> None:
    _fake_fmnist(tmp_path)
    fm.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", torch.zeros(19, dtype=torch.uint8))
    with pytest.raises(CorruptDataError, match="19"):
        fm.load_fashion_mnist("train", tmp_path)
    fm.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", torch.full((10,), 10, dtype=torch.uint8))
    with pytest.raises(CorruptDataError, match="labels must be 0..9"):
        fm.load_fashion_mnist("test", tmp_path)


def test_wrong_image_shape(tmp_path: Path) -> None:
    _fake_fmnist(tmp_path)
    fm.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", torch.zeros(10, 32, 32, dtype=torch.uint8))
    with pytest.raises(CorruptDataError, match="28 x 28"):
        fm.load_fashion_mnist("test", tmp_path)


# ---------------------------------------------------------------------------
# Dataset, normalisation, augmentation, loader.
# ---------------------------------------------------------------------------

def _dataset(n: int = 64, **kwargs) -> fm.FashionMNIST:
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    return fm.FashionMNIST(images=images, labels=torch.arange(n), **kwargs)


def test_normalisation_is_mean_02860_std_03530() -> None:
    ds = _dataset()
    x, y = ds[5]
    assert x.shape == (1, 28, 28) and y.item() == 5
    expected = (ds.images[5].double() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[0].double(), expected, atol=1e-6)


def test_subset_is_fixed_whatever_the_seed() -> None:
    a, b = _dataset(subset=10, seed=0), _dataset(subset=10, seed=7)
    assert len(a) == 10 and torch.equal(a.labels, b.labels)
    assert len(set(a.labels.tolist())) == 10 and a.labels.tolist() != list(range(10))  # random, not the first ten
    with pytest.raises(ValueError, match="subset"):
        _dataset(subset=0)


def _windows(image: torch.Tensor, pad: int = 2) -> list[torch.Tensor]:
    """Every crop of the zero-padded image at every offset, flipped and not."""
    padded = F.pad(image, [pad] * 4)
    h, w = image.shape[-2:]
    crops = [padded[..., dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return crops + [c.flip(-1) for c in crops]


def test_random_crop_flip_takes_windows_of_the_padded_image() -> None:
    images = torch.rand(200, 2, 6, 5)
    out = fm.random_crop_flip(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    hits = []
    for i in range(len(images)):
        matches = [k for k, c in enumerate(_windows(images[i])) if torch.equal(out[i], c)]
        assert len(matches) == 1, f"image {i} is not a (flipped) window of the padded input"
        hits.append(matches[0])
    assert len(set(hits)) > 40  # most of the 50 offset/flip combinations occur in 200 draws
    flipped = sum(h >= 25 for h in hits) / len(hits)
    assert 0.38 < flipped < 0.62


def test_augmented_dataset_pads_with_black() -> None:
    ds = fm.FashionMNIST(images=torch.full((400, 28, 28), 255, dtype=torch.uint8), labels=torch.zeros(400),
                         augment=True)
    x, _ = ds[list(range(400))]
    black, white = (0 - fm.MEAN) / fm.STD, (1 - fm.MEAN) / fm.STD
    values = torch.unique(x.round(decimals=4))
    assert torch.allclose(values, torch.tensor([black, white]).round(decimals=4))
    assert torch.isclose(x, torch.tensor(black)).any(dim=(1, 2, 3)).float().mean() > 0.8  # 24 of 25 offsets show some padding


def test_loader_is_one_pass_over_the_data_and_reproducible() -> None:
    ds = _dataset(50)
    loader = fm.fashion_mnist_loader(dataset=ds, batch_size=16, seed=4)
    epoch1 = torch.cat([y for _, y in loader])
    epoch2 = torch.cat([y for _, y in loader])
    assert sorted(epoch1.tolist()) == list(range(50)) and sorted(epoch2.tolist()) == list(range(50))
    assert epoch1.tolist() != epoch2.tolist()  # reshuffled each epoch
    again = torch.cat([y for _, y in fm.fashion_mnist_loader(dataset=_dataset(50), batch_size=16, seed=4)])
    assert torch.equal(again, epoch1)
    x, y = next(iter(loader))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_test_loader_is_in_order_and_not_augmented() -> None:
    ds = _dataset(20)
    x, y = next(iter(fm.fashion_mnist_loader("test", dataset=ds, batch_size=20)))
    assert y.tolist() == list(range(20))
    assert torch.equal(x, ds[list(range(20))][0])


@needs_fmnist
def test_real_fashion_mnist() -> None:
    images, labels = fm.load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and torch.equal(torch.bincount(labels), torch.full((10,), 6000))
    pixels = images.double() / 255
    assert abs(pixels.mean().item() - fm.MEAN) < 5e-4 and abs(pixels.std().item() - fm.STD) < 5e-4
    test_images, test_labels = fm.load_fashion_mnist("test")
    assert test_images.shape == (10000, 28, 28) and torch.equal(torch.bincount(test_labels), torch.full((10,), 1000))
    x, y = next(iter(fm.fashion_mnist_loader("train", batch_size=128)))
    assert x.shape == (128, 1, 28, 28)


# ---------------------------------------------------------------------------
# Super-resolution.
# ---------------------------------------------------------------------------

def test_rgb_to_y_bt601() -> None:
    colours = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    y = sr.rgb_to_y(colours.reshape(5, 3, 1, 1)).flatten() * 255
    assert torch.allclose(y, torch.tensor([16, 235, 16 + 65.481, 16 + 128.553, 16 + 24.966], dtype=torch.float64))


def test_psnr_formula_and_border() -> None:
    hr = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0)).mul(200).round().div(255)
    for levels in (1, 3, 10):  # a constant error of d grey levels: PSNR = 20 log10(255 / d)
        assert sr.psnr_y(hr + levels / 255, hr, scale=2) == pytest.approx(20 * math.log10(255 / levels), abs=1e-9)
    damaged = hr.clone()
    damaged[..., :2, :] = 0  # only the border of width 2 is wrong
    assert math.isinf(sr.psnr_y(damaged, hr, scale=2))
    assert math.isfinite(sr.psnr_y(damaged, hr, scale=1))
    per_image = sr.psnr_y(hr + torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1) / 255, hr, 2, average=False)
    assert per_image.tolist() == pytest.approx([20 * math.log10(255), 20 * math.log10(255 / 2)])


def test_psnr_rgb_goes_through_y() -> None:
    hr = torch.rand(1, 3, 10, 10, dtype=torch.float64).mul(255).round().div(255)
    out = hr.clone()
    out[:, 0] += 10 / 255  # red +10 grey levels: Y moves by 10 * 65.481 / 255
    out = out.clamp(0, 1)
    mse = ((sr.rgb_to_y(out) - sr.rgb_to_y(hr))[..., 2:-2, 2:-2] * 255).square().mean().item()
    assert sr.psnr_y(out, hr, scale=2) == pytest.approx(10 * math.log10(255 ** 2 / mse))
    with pytest.raises(ValueError, match="same shape"):
        sr.psnr_y(out[..., :8], hr, scale=2)


def test_bicubic_downscale_keeps_constants_and_linear_ramps() -> None:
    assert torch.equal(sr.bicubic_downscale(torch.full((1, 1, 16, 16), 100 / 255), 2),
                       torch.full((1, 1, 8, 8), 100 / 255))
    # A bicubic kernel reproduces linear functions: inside the image, LR pixel i holds the
    # ramp's value at the centre of its HR footprint, HR coordinate (i + 0.5) * s - 0.5.
    s, n = 2, 32
    ramp = (torch.arange(n, dtype=torch.float64) * 4 + 20).div(255).expand(1, 1, n, n)
    lr = sr.bicubic_downscale(ramp, s)
    centres = ((torch.arange(n // s, dtype=torch.float64) + 0.5) * s - 0.5) * 4 + 20
    assert torch.allclose(lr[0, 0, 5, 3:-3] * 255, centres[3:-3], atol=0.5 + 1e-9)
    assert torch.equal(lr, lr.mul(255).round().div(255))  # 8-bit
    assert sr.bicubic_downscale(torch.rand(3, 9, 11), 2).shape == (3, 4, 5)


def test_sr_patches_are_aligned_and_transformed_alike() -> None:
    # A smooth image: the bicubic LR of an HR patch matches the LR patch away from its edges.
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 96), torch.linspace(0, 5, 120), indexing="ij")
    image = (0.5 + 0.4 * torch.sin(yy) * torch.cos(xx)).unsqueeze(0)
    ds = sr.SRPatches(images=[image], scale=2, lr_patch=16, patches=12, seed=1)
    assert len(ds) == 12
    for k in range(len(ds)):
        lr, hr = ds[k]
        assert lr.shape == (1, 16, 16) and hr.shape == (1, 32, 32)
        again = sr.bicubic_downscale(hr, 2)
        assert (again - lr)[..., 3:-3, 3:-3].abs().max() <= 1.5 / 255
    assert torch.equal(ds[3][0], ds[3][0])  # reproducible
    first = ds[0][0].clone()
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], first)
    with pytest.raises(ValueError, match="smaller than lr_patch"):
        sr.SRPatches(images=[torch.rand(1, 20, 20)], lr_patch=16)


def test_sr_train_and_test_photographs_are_disjoint() -> None:
    assert not set(sr.TRAIN_IMAGES) & set(sr.TEST_IMAGES)


def test_real_sr_photographs() -> None:
    pytest.importorskip("skimage")
    lr, hr = next(iter(sr.sr_loader("train", patches=8, batch_size=4)))
    assert lr.shape == (4, 1, 32, 32) and hr.shape == (4, 1, 64, 64)
    assert 16 / 255 - 1e-6 <= hr.min() and hr.max() <= 235 / 255 + 1e-6  # Y range
    test = list(sr.sr_loader("test"))
    assert len(test) == len(sr.TEST_IMAGES)
    for lr, hr in test:
        assert hr.shape[-2:] == (lr.shape[-2] * 2, lr.shape[-1] * 2)
    assert 25 < sr.bicubic_psnr() < 40
    with pytest.raises(DatasetNotFoundError, match="no photograph"):
        sr.load_photo("no_such_photo")
