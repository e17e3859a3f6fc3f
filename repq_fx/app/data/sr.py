"""x2 (or xN) super-resolution data from the photographs that ship inside scikit-image, offline.

The split is fixed by image, so no test picture is ever seen in training:

- train: astronaut, coffee, hubble_deep_field, immunohistochemistry, retina, moon, grass,
  gravel, brick, cell, clock (about 4.4 megapixels in all);
- test: chelsea, rocket, coins, camera.

Degradation is the usual bicubic one: the HR image is cropped to a multiple of ``scale`` and
shrunk with an antialiased bicubic kernel (``F.interpolate(..., mode="bicubic",
antialias=True)``, which widens the kernel by ``scale`` like MATLAB's ``imresize``), then
clamped and rounded to 8 bits as a saved LR image would be.

Like ECBSR, models see the luma channel only by default (``channels=1``): Y of ITU-R BT.601
as MATLAB's ``rgb2ycbcr`` computes it, divided by 255 (so Y lies in [16/255, 235/255]).
``channels=3`` gives RGB in [0, 1] instead. Grey photographs count as R = G = B.

>>> hr = torch.rand(1, 1, 8, 8)
>>> bicubic_downscale(hr, 2).shape
torch.Size([1, 1, 4, 4])
>>> round(psnr_y(hr, hr.clamp(0, 0.5), scale=2), 2) > 0
True
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ...errors import DatasetNotFoundError

__all__ = [
    "TEST_IMAGES", "TRAIN_IMAGES", "SRImages", "SRPatches", "bicubic_downscale", "bicubic_psnr", "load_photo", "psnr_y",
    "rgb_to_y", "sr_loader",
]

TRAIN_IMAGES = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "moon",
                "grass", "gravel", "brick", "cell", "clock")
TEST_IMAGES = ("chelsea", "rocket", "coins", "camera")
INSTALL_HINT = "install scikit-image (`pip install scikit-image`), whose package ships these photographs"


def rgb_to_y(rgb: Tensor) -> Tensor:
    """Luma of ITU-R BT.601 as MATLAB's ``rgb2ycbcr``, on ``[..., 3, H, W]`` RGB in [0, 1]:
    ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255``, returned as ``[..., 1, H, W]``.

    >>> round(rgb_to_y(torch.ones(3, 1, 1)).item() * 255, 4)   # white: Y = 235
    235.0
    """
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=rgb.dtype, device=rgb.device).reshape(3, 1, 1)
    return (16.0 + (rgb * weights).sum(dim=-3, keepdim=True)) / 255.0


def bicubic_downscale(hr: Tensor, scale: int) -> Tensor:
    """The LR image of ``hr`` (``[B, C, H, W]`` or ``[C, H, W]``, values in [0, 1]): crop H and W
    down to multiples of ``scale``, antialiased bicubic shrink by ``scale``, clamp to [0, 1] and
    round to 8 bits.

    >>> bicubic_downscale(torch.full((1, 5, 7), 0.5), 2).shape   # cropped to 4x6 first
    torch.Size([1, 2, 3])
    """
    batched = hr.dim() == 4
    x = hr if batched else hr.unsqueeze(0)
    h, w = x.shape[-2] // scale * scale, x.shape[-1] // scale * scale
    lr = F.interpolate(x[..., :h, :w], scale_factor=1.0 / scale, mode="bicubic", antialias=True,
                       align_corners=False)
    lr = lr.clamp(0.0, 1.0).mul(255.0).round().div(255.0)
    return lr if batched else lr[0]


def psnr_y(sr: Tensor, hr: Tensor, scale: int, *, average: bool = True) -> float | Tensor:
    """PSNR in dB on the luma channel, as SR papers report it.

    ``PSNR = 10 * log10(255^2 / MSE)``, ``MSE = mean((Y_sr - Y_hr)^2)`` with Y on the 0..255
    scale, over the image without a border of ``scale`` pixels on every side (bicubic and
    learned upscalers are unreliable there). Both images are first clamped to [0, 1] and
    rounded to 8 bits, as saved images would be (for ``hr``, an 8-bit photograph, this only
    removes float error), in float64. Inputs are ``[B, C, H, W]`` (or ``[C, H, W]``)
    with C = 3 (RGB in [0, 1], converted with :func:`rgb_to_y`) or C = 1 (already Y / 255).
    Returns the mean over the batch, or per-image values with ``average=False``.

    >>> hr = torch.zeros(1, 1, 8, 8)
    >>> sr = hr.clone(); sr[..., 2:6, 2:6] = 1 / 255      # one grey level off on the 4x4 centre
    >>> round(psnr_y(sr, hr, scale=2), 4)                 # 10 log10(255^2 / 1)
    48.1308
    """
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape; got {list(sr.shape)} and {list(hr.shape)}")
    if sr.dim() == 3:
        sr, hr = sr.unsqueeze(0), hr.unsqueeze(0)
    if sr.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 (Y) or 3 (RGB) channels; got {sr.shape[1]}")
    sr, hr = (t.detach().double().clamp(0.0, 1.0).mul(255.0).round().div(255.0) for t in (sr, hr))
    if sr.shape[1] == 3:
        sr, hr = rgb_to_y(sr), rgb_to_y(hr)
    if scale > 0:
        sr, hr = sr[..., scale:-scale, scale:-scale], hr[..., scale:-scale, scale:-scale]
    mse = ((sr - hr) * 255.0).square().mean(dim=(1, 2, 3))
    psnr = 10.0 * torch.log10(255.0 ** 2 / mse)
    return psnr.mean().item() if average else psnr


def load_photo(name: str, channels: int = 1) -> Tensor:
    """One scikit-image photograph as float ``[channels, H, W]`` in [0, 1]: Y / 255 for
    ``channels=1``, RGB for ``channels=3`` (grey photographs repeated).

    >>> load_photo("camera").shape   # doctest: +SKIP
    torch.Size([1, 512, 512])
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (Y) or 3 (RGB); got {channels}")
    rgb = _load_rgb(name)
    return rgb_to_y(rgb) if channels == 1 else rgb.clone()


@functools.lru_cache(maxsize=None)
def _load_rgb(name: str) -> Tensor:
    try:
        import skimage.data
    except ImportError:
        raise DatasetNotFoundError(f"the super-resolution photographs come from scikit-image; {INSTALL_HINT}") from None
    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise DatasetNotFoundError(f"skimage.data has no photograph {name!r}; {INSTALL_HINT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = loader()
    except Exception as e:  # a photograph that would need a download (pooch) in this skimage version
        raise DatasetNotFoundError(f"skimage.data.{name}() failed offline ({type(e).__name__}: {e}); "
                                   f"{INSTALL_HINT}, a version that ships it") from None
    image = torch.from_numpy(array.copy())
    if image.dim() == 2:
        image = image.unsqueeze(-1).expand(-1, -1, 3)
    return image[..., :3].permute(2, 0, 1).float().div(255.0).contiguous()


@functools.lru_cache(maxsize=8)
def _pairs(names: tuple[str, ...], scale: int, channels: int) -> tuple[tuple[Tensor, Tensor], ...]:
    """(LR, HR) per photograph, HR cropped to a multiple of ``scale``."""
    return _pairs_of([load_photo(name, channels) for name in names], scale)


def _pairs_of(images: Sequence[Tensor], scale: int) -> tuple[tuple[Tensor, Tensor], ...]:
    out = []
    for hr in images:
        h, w = hr.shape[-2] // scale * scale, hr.shape[-1] // scale * scale
        hr = hr[:, :h, :w].contiguous()
        out.append((bicubic_downscale(hr, scale), hr))
    return tuple(out)


class SRPatches(Dataset):
    """Random aligned training patches: ``(lr [C, p, p], hr [C, p*scale, p*scale])``, with a random
    flip and 90-degree rotation (the 8 dihedral transforms, applied to both alike).

    An "epoch" is ``patches`` draws; image ``i`` is picked with probability proportional to
    its area. Draws come from ``seed`` and the index, so ``dataset[k]`` is reproducible.

    >>> ds = SRPatches(patches=4, lr_patch=8, images=[torch.rand(1, 40, 40)])
    >>> [t.shape for t in ds[0]]
    [torch.Size([1, 8, 8]), torch.Size([1, 16, 16])]
    """

    def __init__(self, names: Sequence[str] = TRAIN_IMAGES, *, scale: int = 2, lr_patch: int = 32,
                 patches: int = 8000, channels: int = 1, seed: int = 0, epoch: int = 0,
                 images: Sequence[Tensor] | None = None) -> None:
        self.pairs = _pairs(tuple(names), scale, channels) if images is None else _pairs_of(images, scale)
        for lr, _ in self.pairs:
            if min(lr.shape[-2:]) < lr_patch:
                raise ValueError(f"an LR image of {list(lr.shape[-2:])} is smaller than lr_patch={lr_patch}")
        self.scale, self.lr_patch, self.patches, self.seed, self.epoch = scale, lr_patch, patches, seed, epoch
        self.weights = torch.tensor([float(lr.shape[-2] * lr.shape[-1]) for lr, _ in self.pairs])

    def __len__(self) -> int:
        return self.patches

    def set_epoch(self, epoch: int) -> None:
        """Draw other patches in the next pass (the loop calls it once per epoch)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2 ** 63)
        i = int(torch.multinomial(self.weights, 1, generator=g))
        lr, hr = self.pairs[i]
        p, s = self.lr_patch, self.scale
        y = int(torch.randint(0, lr.shape[-2] - p + 1, (1,), generator=g))
        x = int(torch.randint(0, lr.shape[-1] - p + 1, (1,), generator=g))
        lr_p = lr[:, y:y + p, x:x + p]
        hr_p = hr[:, y * s:(y + p) * s, x * s:(x + p) * s]
        flip, rot = torch.randint(0, 2, (2,), generator=g).tolist()[0], int(torch.randint(0, 4, (1,), generator=g))
        if flip:
            lr_p, hr_p = lr_p.flip(-1), hr_p.flip(-1)
        return torch.rot90(lr_p, rot, (-2, -1)).contiguous(), torch.rot90(hr_p, rot, (-2, -1)).contiguous()


class SRImages(Dataset):
    """Whole images: ``(lr [C, h, w], hr [C, h*scale, w*scale])`` per photograph (sizes differ, so
    batch size 1).

    >>> ds = SRImages(images=[torch.rand(1, 9, 12)])
    >>> [list(t.shape) for t in ds[0]]
    [[1, 4, 6], [1, 8, 12]]
    """

    def __init__(self, names: Sequence[str] = TEST_IMAGES, *, scale: int = 2, channels: int = 1,
                 images: Sequence[Tensor] | None = None) -> None:
        self.pairs = _pairs(tuple(names), scale, channels) if images is None else _pairs_of(images, scale)
        self.scale = scale

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.pairs[index]


def sr_loader(split: str = "train", *, scale: int = 2, batch_size: int = 16, lr_patch: int = 32,
              patches: int | None = None, channels: int = 1, seed: int = 0) -> DataLoader:
    """``"train"``: batches of random patches (``patches`` per epoch, default 8000; LR patches of
    ``lr_patch`` pixels). ``"test"``: the test photographs one at a time (``batch_size`` ignored),
    or only the first ``patches`` of them if given.

    >>> batch = next(iter(sr_loader("train", patches=32, batch_size=8)))   # doctest: +SKIP
    >>> [list(t.shape) for t in batch]                                      # doctest: +SKIP
    [[8, 1, 32, 32], [8, 1, 64, 64]]
    """
    if split == "train":
        dataset = SRPatches(TRAIN_IMAGES, scale=scale, lr_patch=lr_patch, patches=patches or 8000,
                            channels=channels, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
    if split == "test":
        names = TEST_IMAGES if patches is None else TEST_IMAGES[:max(1, patches)]
        return DataLoader(SRImages(names, scale=scale, channels=channels), batch_size=1, shuffle=False)
    raise ValueError(f"split must be 'train' or 'test'; got {split!r}")


def bicubic_psnr(scale: int = 2, channels: int = 1, names: Sequence[str] = TEST_IMAGES) -> float:
    """Mean Y PSNR of plain bicubic upscaling on the test photographs: the floor an SR model must beat.

    >>> bicubic_psnr() > 25   # doctest: +SKIP
    True
    """
    values = []
    for lr, hr in _pairs(tuple(names), scale, channels):
        up = F.interpolate(lr.unsqueeze(0), scale_factor=scale, mode="bicubic", align_corners=False)
        values.append(psnr_y(up, hr.unsqueeze(0), scale))
    return sum(values) / len(values) if values else math.nan
