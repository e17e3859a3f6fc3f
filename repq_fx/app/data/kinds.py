"""The data a training run can read, by the name ``--data`` (``TrainConfig.data``) gives it.

:data:`KINDS` maps each kind to its task, how to build its training and test datasets, and how
to load them (datasets and loaders are built apart, so the training set can be given another
sampler). ``fashion-mnist`` and ``sr`` are fixed data sets; ``imagefolder:DIR`` and
``srfolder:DIR`` read the user's own images from ``DIR``:

- ``imagefolder:DIR``: classification, torchvision's ``ImageFolder`` layout
  (``DIR/train/CLASS/IMAGE``, ``DIR/val/CLASS/IMAGE``), see :mod:`repq_fx.app.data.imagefolder`;
- ``srfolder:DIR``: x``scale`` super-resolution on the photographs in ``DIR/train/`` and
  ``DIR/val/``, degraded and patched as ``sr``, see :mod:`repq_fx.app.data.srfolder`.

The folder is stored absolute (:func:`canonical_data`), so a checkpoint names the data it came from.

>>> parse_data("imagefolder:/data/pets")
('imagefolder', PosixPath('/data/pets'))
>>> KINDS["srfolder"].task, parse_data("fashion-mnist")
('sr', ('fashion-mnist', None))
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ...errors import ConfigError

if TYPE_CHECKING:
    from ..train import TrainConfig

__all__ = ["DATA_FORMS", "DataKind", "KINDS", "canonical_data", "data_classes", "data_kind", "data_shape",
           "parse_data"]

DATA_FORMS = "fashion-mnist, sr, imagefolder:DIR or srfolder:DIR"
FASHION_MNIST_CLASSES, FASHION_MNIST_SIZE = 10, (1, 28, 28)
FOLDER_INPUT_SIZE = (3, 224, 224)  # imagefolder without --input-size: what timm's ImageNet models take


@dataclass(frozen=True)
class DataKind:
    """One kind of data: its task, whether it takes ``:DIR``, and builders.

    ``train_set(config, seed)`` and ``test_set(config)`` return datasets; ``loader(dataset, config,
    train, seed)`` wraps one in its loader. ``seed`` already mixes the run's seed and the epoch.
    ``shape(config)`` is ``(classes or None, (C, H, W))`` of one input as the data gives it.
    """

    task: str  # "classification" or "sr"
    folder: bool
    train_set: Callable[["TrainConfig", int], Dataset]
    test_set: Callable[["TrainConfig"], Dataset]
    loader: Callable[[Dataset, "TrainConfig", bool, int], Iterable]
    shape: Callable[["TrainConfig"], tuple[int | None, tuple[int, ...]]]


def parse_data(text: str) -> tuple[str, Path | None]:
    """``(kind, folder)`` of a ``--data`` value; :class:`~repq_fx.errors.ConfigError` for an unknown
    kind, a folder kind without a folder, or a folder given to a fixed data set.

    >>> parse_data("sr")
    ('sr', None)
    >>> parse_data("imagefolder")
    Traceback (most recent call last):
    ...
    repq_fx.errors.ConfigError: data imagefolder needs a folder: imagefolder:DIR
    """
    kind, sep, folder = text.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"data must be one of {DATA_FORMS}; got {text!r}")
    if KINDS[kind].folder and not folder:
        raise ConfigError(f"data {kind} needs a folder: {kind}:DIR")
    if not KINDS[kind].folder and sep:
        raise ConfigError(f"data {kind} is a fixed data set and takes no folder; for your own images use "
                          f"{'srfolder' if KINDS[kind].task == 'sr' else 'imagefolder'}:DIR")
    return kind, Path(folder) if folder else None


def canonical_data(text: str) -> str:
    """``text`` with its folder made absolute (``~`` expanded, symlinks kept).

    >>> canonical_data("sr"), canonical_data("imagefolder:/data/x/../pets/")
    ('sr', 'imagefolder:/data/pets')
    """
    kind, folder = parse_data(text)
    if folder is None:
        return kind
    return f"{kind}:{os.path.abspath(folder.expanduser())}"


def data_kind(text: str) -> DataKind:
    """The :class:`DataKind` of a ``--data`` value.

    >>> data_kind("imagefolder:pets").task
    'classification'
    """
    return KINDS[parse_data(text)[0]]


def data_shape(config: "TrainConfig") -> tuple[int | None, tuple[int, ...]]:
    """``(classes or None, (C, H, W))`` of one input of ``config``'s data (resolved defaults).

    >>> from repq_fx.app.train import TrainConfig
    >>> data_shape(TrainConfig(model="m:N")), data_shape(TrainConfig(model="m:N", data="sr"))
    ((10, (1, 28, 28)), (None, (1, 32, 32)))
    """
    return data_kind(config.data).shape(config.resolved())


def data_classes(config: "TrainConfig") -> tuple[str, ...] | None:
    """The class names of ``config``'s image folder (the sub-folders of ``train/``; folders only, no
    image is opened); None for the other kinds, whose classes are fixed or absent.

    >>> from repq_fx.app.train import TrainConfig
    >>> data_classes(TrainConfig(model="m:N")) is None
    True
    """
    kind, folder = parse_data(config.data)
    if kind != "imagefolder":
        return None
    from .imagefolder import image_folder_classes

    return tuple(image_folder_classes(folder))


# ---------------------------------------------------------------------------
# Fashion-MNIST and the scikit-image photographs (read in memory, in the main process).
# ---------------------------------------------------------------------------

def _fmnist_train(config: "TrainConfig", seed: int) -> Dataset:
    from .fashion_mnist import FashionMNIST

    return FashionMNIST("train", augment=True, subset=config.subset, seed=seed)


def _fmnist_test(config: "TrainConfig") -> Dataset:
    from .fashion_mnist import FashionMNIST

    return FashionMNIST("test", augment=False, subset=config.test_subset)


def _fmnist_loader(dataset: Dataset, config: "TrainConfig", train: bool, seed: int) -> Iterable:
    from .fashion_mnist import fashion_mnist_loader

    return fashion_mnist_loader("train" if train else "test", dataset=dataset, seed=seed,
                                batch_size=config.batch_size if train else 500)


def _sr_train(config: "TrainConfig", seed: int) -> Dataset:
    from .sr import TRAIN_IMAGES, SRPatches

    return SRPatches(TRAIN_IMAGES, scale=config.scale, lr_patch=config.lr_patch, patches=config.subset or 4000,
                     seed=seed)


def _sr_test(config: "TrainConfig") -> Dataset:
    from .sr import TEST_IMAGES, SRImages

    names = TEST_IMAGES if config.test_subset is None else TEST_IMAGES[:max(1, config.test_subset)]
    return SRImages(names, scale=config.scale)


def _sr_loader(dataset: Dataset, config: "TrainConfig", train: bool, seed: int) -> Iterable:
    """Patches in batches (train) or whole images one at a time (test: sizes differ)."""
    return DataLoader(dataset, batch_size=config.batch_size if train else 1, shuffle=False,
                      num_workers=config.workers)


def _sr_shape(config: "TrainConfig") -> tuple[int | None, tuple[int, ...]]:
    return None, (1, config.lr_patch, config.lr_patch)


# ---------------------------------------------------------------------------
# The user's own folders.
# ---------------------------------------------------------------------------

def _first(dataset: Dataset, n: int | None) -> Dataset:
    return dataset if n is None else Subset(dataset, range(min(n, len(dataset))))


def _fixed_random(dataset: Dataset, n: int | None) -> Dataset:
    """A fixed random ``n`` of ``dataset`` (the same for every seed, as Fashion-MNIST's ``subset``)."""
    if n is None or n >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    return Subset(dataset, keep.sort().values.tolist())


def _folder_classes(config: "TrainConfig") -> list[str]:
    return list(config.classes) if config.classes is not None else list(data_classes(config) or ())


def _imagefolder_train(config: "TrainConfig", seed: int) -> Dataset:
    from ...errors import CorruptDataError
    from .imagefolder import image_folder_classes, image_folder_split

    root = parse_data(config.data)[1]
    found = image_folder_classes(root)
    if config.classes is not None and list(config.classes) != found:
        raise CorruptDataError(f"{root / 'train'} has the classes {', '.join(found)}; this run's model has "
                               f"{', '.join(config.classes)}")
    dataset = image_folder_split(root, "train", found, config.input_size, train=True, seed=seed)
    return _fixed_random(dataset, config.subset)


def _imagefolder_test(config: "TrainConfig") -> Dataset:
    from .imagefolder import image_folder_split

    root = parse_data(config.data)[1]
    dataset = image_folder_split(root, "val", _folder_classes(config), config.input_size, train=False)
    return _first(dataset, config.test_subset)


def _imagefolder_loader(dataset: Dataset, config: "TrainConfig", train: bool, seed: int) -> Iterable:
    from .imagefolder import image_loader

    return image_loader(dataset, config.batch_size, shuffle=train, workers=config.workers, seed=seed)


def _imagefolder_shape(config: "TrainConfig") -> tuple[int | None, tuple[int, ...]]:
    classes = _folder_classes(config)
    return len(classes), tuple(config.input_size or FOLDER_INPUT_SIZE)


def _srfolder_train(config: "TrainConfig", seed: int) -> Dataset:
    from .srfolder import sr_folder_train

    return sr_folder_train(parse_data(config.data)[1], scale=config.scale, lr_patch=config.lr_patch,
                           patches=config.subset or 4000, seed=seed)


def _srfolder_test(config: "TrainConfig") -> Dataset:
    from .srfolder import sr_folder_val

    return sr_folder_val(parse_data(config.data)[1], scale=config.scale, test_subset=config.test_subset)


def _srfolder_loader(dataset: Dataset, config: "TrainConfig", train: bool, seed: int) -> Iterable:
    from .folders import ReadingLoader

    return ReadingLoader(dataset, batch_size=config.batch_size if train else 1, shuffle=False,
                         num_workers=config.workers)


KINDS: dict[str, DataKind] = {
    # Fashion-MNIST from Debian's dataset-fashion-mnist (`make data` installs it)
    "fashion-mnist": DataKind("classification", False, _fmnist_train, _fmnist_test, _fmnist_loader,
                              lambda c: (FASHION_MNIST_CLASSES, FASHION_MNIST_SIZE)),
    # x2 super-resolution on the Y channel of the photographs inside scikit-image
    "sr": DataKind("sr", False, _sr_train, _sr_test, _sr_loader, _sr_shape),
    # the user's images: DIR/train/CLASS/IMAGE and DIR/val/CLASS/IMAGE (torchvision's ImageFolder)
    "imagefolder": DataKind("classification", True, _imagefolder_train, _imagefolder_test, _imagefolder_loader,
                            _imagefolder_shape),
    # the user's photographs for super-resolution: DIR/train/IMAGE and DIR/val/IMAGE
    "srfolder": DataKind("sr", True, _srfolder_train, _srfolder_test, _srfolder_loader, _sr_shape),
}
