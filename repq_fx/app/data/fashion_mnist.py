"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package, offline.

``apt-get install dataset-fashion-mnist`` (or ``make data``) puts the four files into
``/usr/share/datasets/fashion-mnist``; another folder can be named with ``root=`` or the
environment variable ``REPQ_FASHION_MNIST``. Files may be gzipped or not.

IDX format (LeCun's MNIST page): two zero bytes, one byte for the element type (``0x08``
uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64),
one byte for the number of dimensions ``d``, ``d`` big-endian uint32 sizes, then the
elements in C order, big-endian.

Training inputs are normalised with mean 0.2860 and std 0.3530 (the training set's pixel
statistics) and augmented as in ``docs/fashion-mnist-baseline.md``: a random 28x28 crop of the image
padded by 2 black pixels, and a horizontal flip with probability 1/2. Augmentation is done
on whole batches at once.

>>> loader = fashion_mnist_loader("test", batch_size=256, subset=512)   # doctest: +SKIP
>>> x, y = next(iter(loader))                                           # doctest: +SKIP
>>> x.shape, y.shape                                                    # doctest: +SKIP
(torch.Size([256, 1, 28, 28]), torch.Size([256]))
"""
from __future__ import annotations

import functools
import gzip
import os
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from ...errors import CorruptDataError, DatasetNotFoundError

__all__ = [
    "CLASSES", "DEFAULT_ROOT", "MEAN", "STD", "FashionMNIST", "fashion_mnist_loader", "find_root",
    "load_fashion_mnist", "random_crop_flip", "read_idx", "write_idx",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "REPQ_FASHION_MNIST"
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": "train", "test": "t10k"}
INSTALL_HINT = ("install Debian's package with `sudo apt-get install dataset-fashion-mnist` (or run `make data`), "
                f"or point root= / ${ENV_VAR} at a folder holding the four IDX files")

# IDX type code -> (torch dtype, bytes per element)
_IDX_TYPES: dict[int, tuple[torch.dtype, int]] = {
    0x08: (torch.uint8, 1), 0x09: (torch.int8, 1), 0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4), 0x0D: (torch.float32, 4), 0x0E: (torch.float64, 8),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read an IDX file (gzipped or not, told apart by its first bytes) into a tensor.

    Raises :class:`~repq_fx.errors.DatasetNotFoundError` if the file does not exist and
    :class:`~repq_fx.errors.CorruptDataError` if the header is wrong or the data is
    truncated or too long.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x-idx2-ubyte.gz")
    >>> write_idx(path, torch.arange(6, dtype=torch.uint8).reshape(2, 3))
    >>> read_idx(path)
    tensor([[0, 1, 2],
            [3, 4, 5]], dtype=torch.uint8)
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path} does not exist") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise CorruptDataError(f"{path}: not a readable gzip file ({e}); the file is damaged, "
                                   f"reinstall it ({INSTALL_HINT})") from None
    return _parse_idx(raw, path)


def _parse_idx(raw: bytes, path: Path) -> Tensor:
    def corrupt(what: str) -> CorruptDataError:
        return CorruptDataError(f"{path}: not a valid IDX file: {what}; reinstall it ({INSTALL_HINT})")

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise corrupt("the first two bytes must be zero")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise corrupt(f"unknown element type 0x{code:02X}")
    if ndim == 0:
        raise corrupt("zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise corrupt(f"the header of {ndim} dimensions is truncated")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype, size = _IDX_TYPES[code]
    count = 1
    for d in dims:
        count *= d
    if len(raw) - header != count * size:
        raise corrupt(f"shape {dims} needs {count * size} bytes of data, the file has {len(raw) - header} "
                      "(truncated download or wrong file)")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8) if count else torch.empty(0, dtype=torch.uint8)
    if size > 1 and sys.byteorder == "little":  # IDX is big-endian
        data = data.reshape(-1, size).flip(1).reshape(-1)
    return data.view(dtype).reshape(dims).clone()


def write_idx(path: str | os.PathLike[str], tensor: Tensor) -> None:
    """Write ``tensor`` as an IDX file, gzipped if ``path`` ends in ``.gz`` (tests use it for small files).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "y-idx1-ubyte")
    >>> write_idx(path, torch.tensor([7, 2], dtype=torch.uint8)); open(path, "rb").read()
    b'\\x00\\x00\\x08\\x01\\x00\\x00\\x00\\x02\\x07\\x02'
    """
    codes = {dtype: code for code, (dtype, _) in _IDX_TYPES.items()}
    if tensor.dtype not in codes:
        raise ValueError(f"IDX has no element type for {tensor.dtype}; use one of {list(codes)}")
    header = bytes([0, 0, codes[tensor.dtype], tensor.dim()])
    header += b"".join(int(d).to_bytes(4, "big") for d in tensor.shape)
    data = tensor.contiguous().reshape(-1).view(torch.uint8).reshape(-1, tensor.element_size())
    if sys.byteorder == "little":
        data = data.flip(1)
    payload = header + bytes(data.reshape(-1).tolist())
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def find_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder to read Fashion-MNIST from: ``root``, else ``$REPQ_FASHION_MNIST``, else
    ``/usr/share/datasets/fashion-mnist``. It is not checked here.

    >>> find_root("/data/fmnist")
    PosixPath('/data/fmnist')
    """
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DatasetNotFoundError(f"Fashion-MNIST not found: no {root / stem}[.gz]; {INSTALL_HINT}")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike[str] | None = None) -> tuple[Tensor, Tensor]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of ``split`` (``"train"``: 60,000,
    ``"test"``: 10,000). Results are cached per (split, folder).

    Raises :class:`~repq_fx.errors.DatasetNotFoundError` (saying how to install the package)
    if the files are missing and :class:`~repq_fx.errors.CorruptDataError` if they do not
    fit together (count mismatch, labels outside 0..9, images not 28x28).

    >>> images, labels = load_fashion_mnist("test")   # doctest: +SKIP
    >>> images.shape, labels[:5]                       # doctest: +SKIP
    (torch.Size([10000, 28, 28]), tensor([9, 2, 1, 1, 6]))
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}; got {split!r}")
    root = find_root(root).resolve()
    image_path = _idx_file(root, f"{SPLITS[split]}-images-idx3-ubyte")
    label_path = _idx_file(root, f"{SPLITS[split]}-labels-idx1-ubyte")
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (image_path, label_path))
    return _load_cached(image_path, label_path, stamp)


@functools.lru_cache(maxsize=4)
def _load_cached(image_path: Path, label_path: Path, stamp: tuple) -> tuple[Tensor, Tensor]:
    """Read and check one split; ``stamp`` (mtimes and sizes) makes a rewritten file a new cache entry."""
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise CorruptDataError(f"{image_path}: expected uint8 images of N x 28 x 28, got {images.dtype} "
                               f"{list(images.shape)}; reinstall it ({INSTALL_HINT})")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise CorruptDataError(f"{label_path} has {list(labels.shape)} labels for {images.shape[0]} images in "
                               f"{image_path}; the files do not belong together ({INSTALL_HINT})")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise CorruptDataError(f"{label_path}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    return images, labels


def random_crop_flip(images: Tensor, padding: int = 2, generator: torch.Generator | None = None) -> Tensor:
    """Per image: pad by ``padding`` zeros, take a random window of the original size, and flip
    it horizontally with probability 1/2. ``images`` is ``[B, C, H, W]``; all in one gather.

    >>> x = torch.arange(16.).reshape(1, 1, 4, 4)
    >>> y = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(1))
    >>> torch.equal(y, x) or torch.equal(y, x.flip(-1))
    True
    """
    b, c, h, w = images.shape
    padded = F.pad(images, [padding] * 4)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    flip = torch.rand(b, 1, generator=generator) < 0.5
    rows = dy + torch.arange(h)  # [B, H]
    cols = dx + torch.arange(w)  # [B, W]
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(b).reshape(b, 1, 1, 1)
    channel = torch.arange(c).reshape(1, c, 1, 1)
    return padded[batch, channel, rows.reshape(b, 1, h, 1), cols.reshape(b, 1, 1, w)]


class FashionMNIST(Dataset):
    """Fashion-MNIST as normalised float images ``[1, 28, 28]`` and int64 labels.

    ``dataset[i]`` is one ``(image, label)``; ``dataset[list_of_indices]`` is a whole batch
    ``([B, 1, 28, 28], [B])``, augmented in one go (what :func:`fashion_mnist_loader` uses).
    ``subset=n`` keeps a fixed random n images (the same ones for every seed).
    ``images``/``labels`` (uint8 ``[N, 28, 28]``, int ``[N]``) replace the files, e.g. in tests.

    >>> ds = FashionMNIST(images=torch.zeros(4, 28, 28, dtype=torch.uint8), labels=torch.arange(4))
    >>> x, y = ds[[0, 3]]
    >>> x.shape, y.tolist(), round(x[0, 0, 0, 0].item(), 4)   # black is -mean/std
    (torch.Size([2, 1, 28, 28]), [0, 3], -0.8102)
    """

    def __init__(self, split: str = "train", root: str | os.PathLike[str] | None = None, *,
                 augment: bool = False, subset: int | None = None, seed: int = 0,
                 images: Tensor | None = None, labels: Tensor | None = None) -> None:
        if images is None or labels is None:
            images, labels = load_fashion_mnist(split, root)
        if subset is not None:
            if subset < 1:
                raise ValueError(f"subset must be a positive number of images; got {subset}")
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:subset]
            images, labels = images[keep.sort().values], labels[keep.sort().values]
        self.images, self.labels = images, labels.long()
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(index, dtype=torch.long)
        single = idx.dim() == 0
        idx = idx.reshape(-1)
        x = self.images[idx].unsqueeze(1).float().div_(255.0)
        if self.augment:
            x = random_crop_flip(x, 2, self.generator)
        x = (x - MEAN) / STD
        y = self.labels[idx]
        return (x[0], y[0]) if single else (x, y)


def fashion_mnist_loader(split: str = "train", *, batch_size: int = 128, augment: bool | None = None,
                         shuffle: bool | None = None, subset: int | None = None, seed: int = 0,
                         drop_last: bool = False, root: str | os.PathLike[str] | None = None,
                         dataset: FashionMNIST | None = None) -> DataLoader:
    """A ``DataLoader`` of ``(images [B, 1, 28, 28], labels [B])`` batches.

    ``augment`` and ``shuffle`` default to True for ``"train"`` and False for ``"test"``;
    shuffling and augmentation are reproducible from ``seed``. ``dataset`` replaces the one
    built from ``split``/``root``/``subset`` (its own augmentation seed is kept). Batches are gathered and
    augmented as whole tensors in the main process (no workers: nothing to gain on 2 cores).

    >>> ds = FashionMNIST(images=torch.zeros(10, 28, 28, dtype=torch.uint8), labels=torch.zeros(10))
    >>> [len(y) for _, y in fashion_mnist_loader(dataset=ds, batch_size=4)]
    [4, 4, 2]
    """
    train = split == "train"
    if dataset is None:
        dataset = FashionMNIST(split, root, augment=train if augment is None else augment, subset=subset, seed=seed)
    elif augment is not None:
        dataset.augment = augment
    shuffle = train if shuffle is None else shuffle
    sampler = (RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if shuffle
               else SequentialSampler(dataset))
    return DataLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last))
