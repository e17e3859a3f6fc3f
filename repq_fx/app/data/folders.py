"""Reading the user's own image folders: split sub-folders, image files, one image, and a
``DataLoader`` whose worker processes report a bad file as one line.

Every failure names the file or folder: a missing split is
:class:`~repq_fx.errors.DatasetNotFoundError`, an empty folder or an unreadable image is
:class:`~repq_fx.errors.CorruptDataError`. Images are decoded with Pillow (which torchvision
brings) and converted to the mode the model takes (``"RGB"`` or ``"L"``), as torchvision's own
loader does, so folders mixing grey, RGB, RGBA and palette images read alike.

>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> split_folder(root, "train", "imagefolder:DIR reads DIR/train/ and DIR/val/")   # doctest: +ELLIPSIS
Traceback (most recent call last):
...
repq_fx.errors.DatasetNotFoundError: .../train does not exist; imagefolder:DIR reads DIR/train/ and DIR/val/
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from ...errors import CorruptDataError, DataError, DatasetNotFoundError

__all__ = ["IMAGE_EXTENSIONS", "PILLOW_HINT", "ReadingLoader", "image_files", "load_image", "split_folder",
           "worker_message"]

# torchvision's IMG_EXTENSIONS (ImageFolder reads exactly these), case-insensitive
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PILLOW_HINT = "pip install torchvision (it brings Pillow, which decodes the images)"


def split_folder(root: str | os.PathLike[str], split: str, layout: str) -> Path:
    """``root / split`` if it is a folder, else :class:`~repq_fx.errors.DatasetNotFoundError`
    naming it, followed by ``layout`` (the sentence that says what the data needs).

    >>> import tempfile; root = Path(tempfile.mkdtemp()); (root / "val").mkdir()
    >>> split_folder(root, "val", "imagefolder:DIR reads DIR/train/ and DIR/val/").name
    'val'
    """
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetNotFoundError(f"{root} {what}; {layout}")
    folder = root / split
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{folder} does not exist; {layout}")
    return folder


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files directly in ``folder`` (by extension, sorted); an empty list if none.

    >>> import tempfile; folder = Path(tempfile.mkdtemp())
    >>> for name in ("b.PNG", "a.jpg", "notes.txt"): _ = (folder / name).write_bytes(b"")
    >>> [p.name for p in image_files(folder)]
    ['a.jpg', 'b.PNG']
    """
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path: str | os.PathLike[str], mode: str = "RGB") -> Any:
    """The image file ``path`` as a decoded ``PIL.Image`` in ``mode`` (``"RGB"`` or ``"L"``).
    Anything Pillow cannot read (not an image, truncated, too large) is
    :class:`~repq_fx.errors.CorruptDataError` naming the file. A module-level function, so
    ``functools.partial(load_image, mode=...)`` pickles into ``DataLoader`` workers.

    >>> import tempfile; path = Path(tempfile.mkdtemp()) / "x.png"; _ = path.write_bytes(b"not a png")
    >>> load_image(path)   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    repq_fx.errors.CorruptDataError: cannot read the image .../x.png (UnidentifiedImageError: ...); replace or remove it
    """
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"reading image folders needs Pillow; {PILLOW_HINT}") from None
    try:
        with Image.open(path) as image:
            return image.convert(mode)  # decodes the whole file: truncated data fails here, not later
    except Exception as e:  # Pillow raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise CorruptDataError(f"cannot read the image {path} ({type(e).__name__}: {first}); "
                               "replace or remove it") from None


def worker_message(error: BaseException) -> str:
    """The message ``error`` had where it was raised. A ``DataLoader`` worker's exception reaches
    the main process rebuilt around the worker's whole traceback ("Caught CorruptDataError in
    DataLoader worker process 0. Original Traceback ..."); this takes the original message back
    out of its last line. Other errors keep their message.

    >>> worker_message(CorruptDataError("Caught CorruptDataError in DataLoader worker process 1.\\n"
    ...     "Original Traceback (most recent call last):\\n  ...\\n"
    ...     "repq_fx.errors.CorruptDataError: cannot read the image a.png"))
    'cannot read the image a.png'
    """
    text = str(error)
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    if text.startswith("Caught ") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


class ReadingLoader(DataLoader):
    """A ``DataLoader`` (same arguments) for data read from files: a
    :class:`~repq_fx.errors.DataError` raised in a worker process (a corrupt image) reaches the
    caller with its own one-line message, naming the file, instead of the worker's traceback.

    >>> [batch.tolist() for batch in ReadingLoader(range(5), batch_size=2)]
    [[0, 1], [2, 3], [4]]
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DataError as e:
                raise type(e)(worker_message(e)) from None
            yield batch
