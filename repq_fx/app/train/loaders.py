"""The data of a run: its datasets and loaders, each epoch's shuffling and augmentation seeded by
``(seed, epoch)``, and the shape of one input of its model.

>>> model_input_size(TrainConfig(model="examples:ECBSR", data="sr"))
(1, 32, 32)
"""
from __future__ import annotations

from collections.abc import Iterable

from torch.utils.data import Dataset

from .config import TrainConfig
from .model import float_model, input_channels


def _data_seed(config: TrainConfig, epoch: int) -> int:
    return config.seed * 10_007 + epoch


def make_datasets(config: TrainConfig, epoch: int = 0) -> tuple[Dataset, Dataset]:
    """``(train, test)`` datasets of the run (:data:`repq_fx.app.data.kinds.KINDS`); the training set's
    augmentation (and SR's patches) are seeded by ``(seed, epoch)``. An image folder is checked
    here (its folders and file lists, not each image), naming what is wrong.

    >>> train, test = make_datasets(TrainConfig(model="examples:RepVGGNet", subset=256))   # doctest: +SKIP
    >>> len(train), len(test)                                                             # doctest: +SKIP
    (256, 10000)
    """
    from ..data.kinds import data_kind

    config = config.resolved()
    kind = data_kind(config.data)
    return kind.train_set(config, _data_seed(config, epoch)), kind.test_set(config)


def make_loaders(config: TrainConfig, epoch: int = 0) -> tuple[Iterable, Iterable]:
    """``(train, test)`` loaders over :func:`make_datasets`; training shuffling/augmentation are seeded by
    ``(seed, epoch)``. Fashion-MNIST: normalised 1x28x28 images; SR: Y-channel patches; image folders:
    ``config.input_size`` images read by ``config.workers`` worker processes.

    >>> train, test = make_loaders(TrainConfig(model="examples:RepVGGNet", subset=256))   # doctest: +SKIP
    >>> len(train), len(test)                                                            # doctest: +SKIP
    (2, 20)
    """
    from ..data.kinds import data_kind

    config = config.resolved()
    kind, seed = data_kind(config.data), _data_seed(config, epoch)
    train, test = make_datasets(config, epoch)
    return kind.loader(train, config, True, seed), kind.loader(test, config, False, seed)


def make_test_loader(config: TrainConfig) -> Iterable:
    """The test loader of :func:`make_loaders` alone (an image folder's ``val/`` only: no ``train/`` needed).

    >>> len(make_test_loader(TrainConfig(model="examples:RepVGGNet", test_subset=1000)))   # doctest: +SKIP
    2
    """
    from ..data.kinds import data_kind

    config = config.resolved()
    kind = data_kind(config.data)
    return kind.loader(kind.test_set(config), config, False, _data_seed(config, 0))


def model_input_size(config: TrainConfig) -> tuple[int, ...]:
    """The shape (without the batch) of one input of the run's model: its data's images, with as many
    channels as the model's first conv takes (a torchvision model on grey images: 3); SR: an LR patch.

    >>> model_input_size(TrainConfig(model="examples:RepVGGNet", data="imagefolder:/x", input_size=(1, 64, 48),
    ...                              classes=("a", "b")))
    (1, 64, 48)
    """
    from ..data.kinds import data_shape

    _, size = data_shape(config)
    if config.task == "sr":
        return tuple(size)
    return ((input_channels(float_model(config)) or size[0]), *size[1:])
