"""Super-resolution on the user's own photographs: ``DIR/train/`` and ``DIR/val/``, each a folder of
images (the extensions of :data:`~repq_fx.app.data.folders.IMAGE_EXTENSIONS`), used exactly like the
scikit-image photographs of :mod:`repq_fx.app.data.sr`: bicubic degradation, random aligned training
patches (:class:`~repq_fx.app.data.sr.SRPatches`), whole val images (:class:`~repq_fx.app.data.sr.SRImages`),
the Y channel by default.

Images are read whole into memory (as the scikit-image photographs are), once per process and
folder content. Each must be at least ``lr_patch * scale`` pixels on both sides for training.

>>> import tempfile; from PIL import Image; root = Path(tempfile.mkdtemp())
>>> for split in ("train", "val"):
...     (root / split).mkdir(); Image.new("RGB", (40, 30), "white").save(root / split / "a.png")
>>> train, val = sr_folder_datasets(root, lr_patch=8, patches=4)
>>> [list(t.shape) for t in train[0]], [list(t.shape) for t in val[0]]
([[1, 8, 8], [1, 16, 16]], [[1, 15, 20], [1, 30, 40]])
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import Tensor

from ...errors import CorruptDataError
from .folders import IMAGE_EXTENSIONS, image_files, load_image, split_folder
from .sr import SRImages, SRPatches, rgb_to_y

__all__ = ["LAYOUT", "load_sr_folder", "sr_folder_datasets", "sr_folder_train", "sr_folder_val"]

LAYOUT = "srfolder:DIR reads the images in DIR/train/ and DIR/val/"


def load_sr_folder(root: str | os.PathLike[str], split: str, channels: int = 1) -> list[tuple[Path, Tensor]]:
    """Every image of ``root/split`` as ``(path, [channels, H, W])`` in [0, 1]: Y / 255 (BT.601, as
    :func:`~repq_fx.app.data.sr.rgb_to_y`) for ``channels=1``, RGB for 3. A missing or empty folder,
    or an unreadable image, is a :class:`~repq_fx.errors.DataError` naming it.

    >>> import tempfile; from PIL import Image; root = Path(tempfile.mkdtemp()); (root / "val").mkdir()
    >>> Image.new("L", (4, 2), 255).save(root / "val" / "w.png")
    >>> [(p.name, list(x.shape), round(x.max().item() * 255)) for p, x in load_sr_folder(root, "val")]
    [('w.png', [1, 2, 4], 235)]
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (Y) or 3 (RGB); got {channels}")
    folder = split_folder(root, split, LAYOUT)
    files = image_files(folder)
    if not files:
        raise CorruptDataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); {LAYOUT}, not in "
                               "sub-folders")
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    return list(_load(folder, channels, stamp))


@functools.lru_cache(maxsize=4)
def _load(folder: Path, channels: int, stamp: tuple) -> tuple[tuple[Path, Tensor], ...]:
    """The images of ``folder``; ``stamp`` (names, mtimes, sizes) makes changed files a new cache entry."""
    out = []
    for name, _, _ in stamp:
        path = folder / name
        image = load_image(path, "RGB")
        rgb = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
        rgb = rgb.permute(2, 0, 1).float().div(255.0)
        out.append((path, rgb_to_y(rgb) if channels == 1 else rgb))
    return tuple(out)


def sr_folder_train(root: str | os.PathLike[str], *, scale: int = 2, lr_patch: int = 32, patches: int = 4000,
                    channels: int = 1, seed: int = 0) -> SRPatches:
    """Random aligned training patches of the images of ``root/train`` (``patches`` per epoch, LR side
    ``lr_patch``), bicubic ``scale``. An image smaller than one patch is an error naming it.
    """
    images = load_sr_folder(root, "train", channels)
    need = lr_patch * scale
    for path, image in images:
        h, w = image.shape[-2:]
        if min(h, w) < need:
            raise CorruptDataError(f"{path} is {w}x{h} pixels, smaller than one {need}x{need} training patch "
                                   f"(LR patch {lr_patch} x scale {scale}); remove it or use larger images")
    return SRPatches(scale=scale, lr_patch=lr_patch, patches=patches, seed=seed, images=[x for _, x in images])


def sr_folder_val(root: str | os.PathLike[str], *, scale: int = 2, channels: int = 1,
                  test_subset: int | None = None) -> SRImages:
    """The whole images of ``root/val`` (the first ``test_subset`` only, if given) with their bicubic
    LR versions. An image too small to score (PSNR leaves out a border of ``scale``) is an error naming it.
    """
    images = load_sr_folder(root, "val", channels)
    for path, image in images:
        h, w = image.shape[-2:]
        if min(h, w) < 4 * scale:
            raise CorruptDataError(f"{path} is {w}x{h} pixels, too small to score at scale {scale} (PSNR leaves "
                                   f"out a {scale}-pixel border); use images of {4 * scale} pixels or more")
    if test_subset is not None:
        images = images[:max(1, test_subset)]
    return SRImages(scale=scale, images=[x for _, x in images])


def sr_folder_datasets(root: str | os.PathLike[str], *, scale: int = 2, lr_patch: int = 32, patches: int = 4000,
                       channels: int = 1, seed: int = 0, test_subset: int | None = None) -> tuple[SRPatches, SRImages]:
    """``(train, val)``: :func:`sr_folder_train` and :func:`sr_folder_val` of ``root``."""
    return (sr_folder_train(root, scale=scale, lr_patch=lr_patch, patches=patches, channels=channels, seed=seed),
            sr_folder_val(root, scale=scale, channels=channels, test_subset=test_subset))
