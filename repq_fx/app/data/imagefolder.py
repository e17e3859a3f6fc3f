"""Classification on the user's own images: torchvision's ``ImageFolder`` layout, timm's usual transforms.

``DIR/train/CLASS/IMAGE`` and ``DIR/val/CLASS/IMAGE`` (any depth below ``CLASS``; the extensions
of :data:`~repq_fx.app.data.folders.IMAGE_EXTENSIONS`; folders starting with a dot, such as
``.ipynb_checkpoints``, are no class). The classes are the sub-folders of ``train/``, sorted; a
``val/`` class folder must be one of them (it may lack some), so a label means the same class in
both splits.

Transforms: the basic ones of timm's and torchvision's ImageNet recipes (timm's default colour
jitter, RandAugment, mixup and random erasing are left out):

- train: ``RandomResizedCrop(H, W)`` (scale 0.08-1, aspect 3/4-4/3), ``RandomHorizontalFlip``,
  ``ToTensor``, ``Normalize``;
- val: ``Resize`` to ``H / 0.875`` (the shorter side; both sides if not square), ``CenterCrop(H, W)``,
  ``ToTensor``, ``Normalize``.

``Normalize`` uses ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); grey images
(1 channel, Pillow's ``"L"`` = BT.601 luma) use the same luma mix of them, mean 0.459 and std 0.226.
Images are converted to RGB (or ``L``) on reading, so grey, RGBA and palette files mix freely.

Datasets and loaders are built apart (:func:`image_folder_datasets`, :func:`image_loader`), so the
training set can be given another sampler (``DistributedSampler``). Random augmentation is seeded
by ``(seed, epoch, index)`` of each image, so it is the same whatever the number of workers and
whichever process reads the image.

>>> image_transforms((3, 32, 32), train=False).transforms[:2]
[Resize(size=36, interpolation=bilinear, max_size=None, antialias=True), CenterCrop(size=(32, 32))]
"""
from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from ...errors import CorruptDataError, DataError
from .folders import IMAGE_EXTENSIONS, PILLOW_HINT, ReadingLoader, image_files, load_image, split_folder

try:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder
except ImportError:  # torchvision is in the timm extra
    raise DataError(f"imagefolder data needs torchvision; {PILLOW_HINT}") from None

__all__ = ["CROP_PCT", "GREY_MEAN", "GREY_STD", "IMAGENET_MEAN", "IMAGENET_STD", "LAYOUT", "ImageFolderSplit",
           "image_folder_classes", "image_folder_datasets", "image_folder_split", "image_loader", "image_transforms"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.459,), (0.226,)  # 0.299 R + 0.587 G + 0.114 B of the above (the std's mix is approximate)
CROP_PCT = 0.875  # val: resize to size / 0.875, then centre crop
LAYOUT = "imagefolder:DIR reads DIR/train/CLASS/IMAGE and DIR/val/CLASS/IMAGE (one folder of images per class)"


def image_transforms(size: Sequence[int], train: bool) -> Callable[[Any], torch.Tensor]:
    """The transform of one PIL image to a normalised ``[C, H, W]`` tensor, ``size = (C, H, W)``
    (see the module docstring).

    >>> from PIL import Image
    >>> image_transforms((1, 8, 8), train=True)(Image.new("L", (20, 10))).shape
    torch.Size([1, 8, 8])
    """
    c, h, w = size
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else (GREY_MEAN, GREY_STD)
    if train:
        ops = [T.RandomResizedCrop((h, w)), T.RandomHorizontalFlip()]
    else:
        resize = int(h / CROP_PCT) if h == w else (int(h / CROP_PCT), int(w / CROP_PCT))
        ops = [T.Resize(resize), T.CenterCrop((h, w))]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])


def _class_folders(folder: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if classes:
        return classes
    loose = image_files(folder)
    if loose:
        raise CorruptDataError(f"{folder} holds images ({loose[0].name}, ...) but no class sub-folders; put each "
                               f"class's images in a folder named after it, e.g. {folder / 'CLASS' / loose[0].name}")
    raise CorruptDataError(f"{folder} has no class sub-folders; {LAYOUT}")


def image_folder_classes(root: str | os.PathLike[str]) -> list[str]:
    """The class names of ``root``: the sub-folders of ``root/train``, sorted. Checks the folders
    only (no image is opened); a missing ``train/`` or one without class folders, or with one
    class only, is a :class:`~repq_fx.errors.DataError` naming the folder.

    >>> import tempfile; root = Path(tempfile.mkdtemp())
    >>> for c in ("dog", "cat"): (root / "train" / c).mkdir(parents=True)
    >>> image_folder_classes(root)
    ['cat', 'dog']
    """
    folder = split_folder(root, "train", LAYOUT)
    classes = _class_folders(folder)
    if len(classes) < 2:
        raise CorruptDataError(f"{folder} has one class folder ({classes[0]}); a classifier needs two or more")
    return classes


class ImageFolderSplit(ImageFolder):
    """One split of an image folder: torchvision's ``ImageFolder`` with a given class list (so
    labels agree between splits), images read by :func:`~repq_fx.app.data.folders.load_image` in
    ``mode``, and, with a ``seed``, the random transforms of image ``i`` seeded by
    ``(seed, epoch, i)`` (:meth:`set_epoch` moves to the next epoch). Built by
    :func:`image_folder_split`, which checks the folders first.
    """

    def __init__(self, root: str | os.PathLike[str], classes: Sequence[str], transform: Callable[[Any], Any],
                 mode: str = "RGB", seed: int | None = None, epoch: int = 0) -> None:
        self.fixed_classes = list(classes)
        super().__init__(str(root), transform=transform, loader=functools.partial(load_image, mode=mode),
                         allow_empty=True)
        self.seed, self.epoch = seed, epoch

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        """The given class list (torchvision's hook for the classes of a folder)."""
        return list(self.fixed_classes), {c: i for i, c in enumerate(self.fixed_classes)}

    def set_epoch(self, epoch: int) -> None:
        """Draw other crops and flips in the next pass."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if self.seed is None:
            return super().__getitem__(index)
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from torch's global generator
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2 ** 63)
            return super().__getitem__(index)


def image_folder_split(root: str | os.PathLike[str], split: str, classes: Sequence[str], size: Sequence[int], *,
                       train: bool, seed: int | None = None, epoch: int = 0) -> ImageFolderSplit:
    """The dataset of ``root/split``: ``(image [C, H, W], label)`` with ``size = (C, H, W)``, train
    or val transforms, labels indexing ``classes``. Checked on building, naming the folder: the
    split exists, its class folders are among ``classes``, it holds images (and in ``train``
    every class does). Images themselves are opened when read.

    >>> import tempfile; from PIL import Image; root = Path(tempfile.mkdtemp())
    >>> for c in ("a", "b"):
    ...     (root / "val" / c).mkdir(parents=True); Image.new("RGB", (9, 9)).save(root / "val" / c / "0.png")
    >>> ds = image_folder_split(root, "val", ["a", "b"], (3, 8, 8), train=False)
    >>> len(ds), ds[1][0].shape, ds[1][1]
    (2, torch.Size([3, 8, 8]), 1)
    """
    folder = split_folder(root, split, LAYOUT)
    unknown = sorted(set(_class_folders(folder)) - set(classes))
    if unknown:
        raise CorruptDataError(f"{folder / unknown[0]} is a class that the training classes ({', '.join(classes)}) "
                               "lack; every class of val/ needs a folder in train/")
    channels = size[0]
    if channels not in (1, 3):
        raise DataError(f"images are read as 1 (grey) or 3 (RGB) channels; got an input size of {channels} channels")
    dataset = ImageFolderSplit(folder, classes, image_transforms(size, train), "L" if channels == 1 else "RGB",
                               seed, epoch)
    counts = collections.Counter(dataset.targets)
    empty = [c for i, c in enumerate(classes) if counts[i] == 0]
    if not dataset.samples or (train and empty):
        where = folder / empty[0] if train and dataset.samples else folder
        raise CorruptDataError(f"{where} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return dataset


def image_folder_datasets(root: str | os.PathLike[str], size: Sequence[int], *, classes: Sequence[str] | None = None,
                          seed: int = 0, epoch: int = 0) -> tuple[ImageFolderSplit, ImageFolderSplit]:
    """``(train, val)`` datasets of the image folder ``root`` (see :func:`image_folder_split`);
    ``classes`` default to :func:`image_folder_classes` and must be them if given.

    >>> import tempfile; from PIL import Image; root = Path(tempfile.mkdtemp())
    >>> for split in ("train", "val"):
    ...     for c in ("a", "b"):
    ...         (root / split / c).mkdir(parents=True); Image.new("L", (9, 9)).save(root / split / c / "0.png")
    >>> train, val = image_folder_datasets(root, (1, 8, 8))
    >>> train.classes, train[0][0].shape
    (['a', 'b'], torch.Size([1, 8, 8]))
    """
    found = image_folder_classes(root)
    if classes is not None and list(classes) != found:
        raise CorruptDataError(f"{Path(root) / 'train'} has the classes {', '.join(found)}; the model was trained on "
                               f"{', '.join(classes)}")
    return (image_folder_split(root, "train", found, size, train=True, seed=seed, epoch=epoch),
            image_folder_split(root, "val", found, size, train=False))


def image_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int = 0, seed: int = 0,
                 sampler: Sampler | None = None) -> ReadingLoader:
    """A loader of ``(images [B, C, H, W], labels [B])`` over ``dataset`` with ``workers`` worker
    processes (0: read in this process), shuffled from ``seed`` (or drawn by ``sampler``, e.g. a
    ``DistributedSampler``, instead). A corrupt image stops it with one line naming the file
    (:class:`~repq_fx.app.data.folders.ReadingLoader`).

    >>> [len(y) for _, y in image_loader([(torch.zeros(3), 0)] * 5, 2, shuffle=True)]
    [2, 2, 1]
    """
    return ReadingLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                         sampler=sampler, num_workers=workers, generator=torch.Generator().manual_seed(seed))
