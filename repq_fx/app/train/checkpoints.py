"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` and checked; a
checkpoint restored to the model it was trained as; the checks that a run may resume one or start from it.

>>> load_checkpoint("/nonexistent.pt")
Traceback (most recent call last):
...
repq_fx.errors.CheckpointError: no checkpoint at /nonexistent.pt
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ...errors import CheckpointError
from .config import CHECKPOINT_FORMAT, RESUME_FIELDS, TrainConfig
from .model import _load_state, build_model


def save_checkpoint(path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` atomically: a temp file in the same folder, flushed and
    fsynced, then ``os.replace``. A crash leaves either the old file or the new one, never half.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "c.pt")
    >>> save_checkpoint(path, {"epoch": 1}); torch.load(path, weights_only=True)
    {'epoch': 1}
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`run_training` with ``torch.load(weights_only=True)``
    onto the CPU and check its layout. Raises :class:`~repq_fx.errors.CheckpointError` if the
    file is missing, unreadable (truncated, not a torch file, holding arbitrary objects) or not
    a repq-fx training checkpoint.

    >>> load_checkpoint("/nonexistent.pt")
    Traceback (most recent call last):
    ...
    repq_fx.errors.CheckpointError: no checkpoint at /nonexistent.pt
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip reader), EOFError, ...
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        first = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0])[:200]
        raise CheckpointError(f"cannot read checkpoint {path}: it is damaged (truncated?) or not a checkpoint "
                              f"written by `repq-fx train` ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a `repq-fx train` checkpoint (format {found!r}, expected "
                              f"{CHECKPOINT_FORMAT!r})")
    missing = {"model", "config", "epoch"} - set(ckpt)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}")
    return ckpt


def restore(path: str | os.PathLike[str], model_spec: str | None = None,
            data: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as (float, RepQ-prepared, or merged and
    quantized) and load its weights: ``(model, checkpoint)``, the model in eval mode.
    ``model_spec``/``data``, if given, must be the checkpoint's
    (:class:`~repq_fx.errors.CheckpointError` otherwise).

    >>> model, ckpt = restore("w4a4.pt")      # doctest: +SKIP
    >>> ckpt["config"]["method"], type(model).__name__                             # doctest: +SKIP
    ('repq-bn', 'GraphModule')
    """
    from ..data.kinds import canonical_data

    ckpt = load_checkpoint(path)
    saved = TrainConfig.from_dict(ckpt["config"])
    for name, value in (("model", model_spec), ("data", data and canonical_data(data))):
        if value is not None and getattr(saved, name) != value:
            raise CheckpointError(f"checkpoint {path} was trained with {name} {getattr(saved, name)!r}, not {value!r}")
    model = build_model(saved)
    _load_state(model, ckpt["model"], str(path))
    return model.eval(), ckpt


def _check_same_classes(path: str | os.PathLike[str], saved: TrainConfig, config: TrainConfig) -> None:
    """The float checkpoint ``path`` was trained on the classes and channels of ``config``'s data."""
    from ..data.kinds import data_shape

    (n_saved, size_saved), (n_now, size_now) = data_shape(saved), data_shape(config)
    if (saved.classes, n_saved, size_saved[0]) != (config.classes, n_now, size_now[0]):
        def what(c: TrainConfig, n: int | None, channels: int) -> str:
            names = f": {', '.join(c.classes)}" if c.classes else ""
            return f"{c.data} ({n} classes{names}; {channels}-channel images)"

        raise CheckpointError(f"--from {path} was trained on {what(saved, n_saved, size_saved[0])}, this run's "
                              f"data is {what(config, n_now, size_now[0])}; train a float model on this data first")


def _check_resumable(path: Path, saved: TrainConfig, config: TrainConfig) -> None:
    a, b = saved.resolved(), config.resolved()
    # a float run has no integer grid: its target (the default, or onnxruntime-vnni when the checkpoint
    # predates targets) says nothing about it
    names = RESUME_FIELDS if a.quantized or b.quantized else tuple(n for n in RESUME_FIELDS if n != "target")
    diffs = [f"{name}: checkpoint {getattr(a, name)!r}, now {getattr(b, name)!r}"
             for name in names if getattr(a, name) != getattr(b, name)]
    if diffs:
        raise CheckpointError(f"cannot resume {path}: it is another run ({'; '.join(diffs)}); rerun the command "
                              "that wrote it with --resume, or write to another --out")
