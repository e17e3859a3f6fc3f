"""What defines a run: :class:`TrainConfig` (model spec, data, method, bits, schedule), its defaults
and the :class:`~repq_fx.QConfig` of its method; :func:`parse_bits` reads ``--bits``.

>>> TrainConfig(model="examples:RepVGGNet", method="lsq", bits=(4, 8)).qconfig().act_bits
8
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ...config import QConfig
from ...errors import CheckpointError, ConfigError
from ...targets import DEFAULT_TARGET, LEGACY_TARGET, TARGETS


CHECKPOINT_FORMAT = "repq_fx.train/1"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --amp: the autocast dtype
METHODS = ("fp", "repq-bn", "repq-bnest", "lsq", "ptq")
QUANTIZED = ("repq-bn", "repq-bnest", "lsq", "ptq")
DATASETS = ("fashion-mnist", "sr", "imagefolder", "srfolder")  # the kinds of repq_fx.app.data.kinds.KINDS
# Fields that must agree between a checkpoint and the run that resumes it.
RESUME_FIELDS = ("model", "data", "method", "bits", "target", "epochs", "batch_size", "lr", "weight_decay", "optimizer",
                 "step_lr_scale", "subset", "seed", "scale", "lr_patch", "input_size", "classes")


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in every checkpoint (``to_dict``).

    ``lr`` and ``weight_decay`` of None pick the defaults for data and method (:meth:`resolved`):
    Fashion-MNIST fp: SGD lr 0.05, weight decay 1e-4 (``docs/fashion-mnist-baseline.md``); quantized: lr 0.01,
    no weight decay; SR: Adam lr 5e-4 (fp) or 1e-4 (quantized), no weight decay.
    ``subset``: training images (Fashion-MNIST, image folders) or training patches per epoch (SR, default 4000).
    ``data``: ``fashion-mnist``, ``sr``, ``imagefolder:DIR`` or ``srfolder:DIR`` (:mod:`repq_fx.app.data.kinds`; the
    folder is stored absolute). ``input_size`` (image folders: ``(C, H, W)``, default 3x224x224) and ``classes``
    (the folder's classes, filled in by :func:`run_training`) shape the model; ``workers`` is the number of
    ``DataLoader`` worker processes (not part of the run: a run may resume with another).

    >>> TrainConfig(model="examples:RepVGGNet").resolved().lr
    0.05
    """

    model: str
    data: str = "fashion-mnist"
    method: str = "fp"
    bits: tuple[int, int] = (8, 8)  # weight bits, activation bits
    epochs: int = 10
    batch_size: int | None = None  # 128 for Fashion-MNIST, 16 for SR
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str | None = None  # "sgd" (Fashion-MNIST default) or "adam" (SR default)
    step_lr_scale: float | None = None  # lr of LSQ steps / lr: 1 with SGD, 0.01 with Adam (see make_optimizer)
    subset: int | None = None
    seed: int = 0
    calib_batches: int = 8
    from_ckpt: str | None = None
    scale: int = 2  # SR
    lr_patch: int = 32  # SR: LR training patch size
    test_subset: int | None = None  # evaluate on fewer test images (quick runs)
    target: str = DEFAULT_TARGET  # quantized methods: the runtime's integer scheme (QConfig.target)
    fit_data: bool = True  # timm/torchvision/examples: build with the data's classes and channels (float_model)
    input_size: tuple[int, ...] | None = None  # imagefolder: C, H, W of the model's input
    classes: tuple[str, ...] | None = None  # imagefolder: the class names, label order
    workers: int = 0  # DataLoader worker processes (0: read in the main process)

    def __post_init__(self) -> None:
        self.bits = tuple(self.bits)
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        from ..data.kinds import canonical_data, data_kind, parse_data

        self.data = canonical_data(self.data)
        kind = parse_data(self.data)[0]
        if self.input_size is not None:
            self.input_size = tuple(self.input_size)
            if kind != "imagefolder":
                raise ConfigError(f"input_size (--input-size) sets the image size of imagefolder data; {self.data} "
                                  "has a size of its own")
            if len(self.input_size) != 3 or self.input_size[0] not in (1, 3) or min(self.input_size) < 1:
                raise ConfigError(f"input_size must be C, H, W with C = 1 (grey) or 3 (RGB); got {self.input_size}")
        if self.classes is not None:
            self.classes = tuple(self.classes)
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0; got {self.workers}")
        if self.workers and kind == "fashion-mnist":
            raise ConfigError("fashion-mnist is held in memory and augmented in whole batches by the main process; "
                              "workers (--workers) are for data read from files (imagefolder, srfolder, sr)")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0; got {self.epochs}")
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        if self.optimizer not in (None, "sgd", "adam"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adam'; got {self.optimizer!r}")
        task = _example_task(self.model)
        if task is not None and (task == "sr") != (data_kind(self.data).task == "sr"):
            raise ConfigError(f"{self.model} is a {'super-resolution' if task == 'sr' else 'classification'} "
                              f"network; it cannot train on --data {self.data}")

    @property
    def task(self) -> str:
        """``"classification"`` or ``"sr"``, by the data.

        >>> TrainConfig(model="m:N", data="srfolder:photos").task
        'sr'
        """
        from ..data.kinds import data_kind

        return data_kind(self.data).task

    @property
    def quantized(self) -> bool:
        """True for every method but ``fp``.

        >>> TrainConfig(model="m:N", method="lsq").quantized
        True
        """
        return self.method in QUANTIZED

    def resolved(self) -> "TrainConfig":
        """A copy with every default filled in (batch size, lr, weight decay, optimizer, image folders' input size;
        ptq: 0 epochs).

        >>> TrainConfig(model="m:N", data="sr", method="repq-bn").resolved().lr
        0.0001
        """
        from ..data.kinds import FOLDER_INPUT_SIZE, parse_data

        sr = self.task == "sr"
        values = asdict(self)
        if values["input_size"] is None and parse_data(self.data)[0] == "imagefolder":
            values["input_size"] = FOLDER_INPUT_SIZE
        if values["batch_size"] is None:
            values["batch_size"] = 16 if sr else 128
        if values["optimizer"] is None:
            values["optimizer"] = "adam" if sr else "sgd"
        if values["lr"] is None:
            if values["optimizer"] == "adam":
                values["lr"] = 1e-4 if self.quantized else 5e-4
            else:
                values["lr"] = 0.01 if self.quantized else 0.05
        if values["weight_decay"] is None:
            values["weight_decay"] = 1e-4 if not sr and not self.quantized else 0.0
        if values["step_lr_scale"] is None:
            values["step_lr_scale"] = 0.01 if values["optimizer"] == "adam" else 1.0
        if self.method == "ptq":
            values["epochs"] = 0
        return TrainConfig(**values)

    def qconfig(self) -> QConfig:
        """The ``repq_fx.QConfig`` of a quantized method (first and last layer at 8 bits).

        >>> TrainConfig(model="m:N", method="ptq", bits=(4, 8)).qconfig().act_quantizer
        'minmax'
        """
        if not self.quantized:
            raise ConfigError("method 'fp' has no QConfig")
        w, a = self.bits
        if self.method == "ptq":
            return QConfig(weight_bits=w, act_bits=a, weight_quantizer="minmax", act_quantizer="minmax",
                           target=self.target)
        bn_mode = "estimate" if self.method == "repq-bnest" else "batch"
        return QConfig(weight_bits=w, act_bits=a, bn_mode=bn_mode, target=self.target)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what ``torch.load(weights_only=True)`` reads back).

        >>> TrainConfig.from_dict(TrainConfig(model="m:N").to_dict()) == TrainConfig(model="m:N")
        True
        """
        d = asdict(self)
        for name in ("bits", "input_size", "classes"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`~repq_fx.errors.CheckpointError`.
        A config written before targets existed trained full-range int8 weights: its target says so.
        One written before ``fit_data`` built timm/torchvision models with their defaults (1000 classes).

        >>> TrainConfig.from_dict({"model": "m:N", "bits": [4, 4]}).bits
        (4, 4)
        >>> TrainConfig.from_dict({"model": "m:N"}).target
        'onnxruntime-vnni'
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"the checkpoint's config has unknown fields {sorted(unknown)}")
        return cls(**{"target": LEGACY_TARGET, "fit_data": False, **data})


def _example_task(spec: str) -> str | None:
    """``"classification"``/``"sr"`` for a registered example network, else None."""
    prefix, _, name = spec.partition(":")
    if prefix != "examples":
        return None
    from ..networks import NETWORKS

    return NETWORKS[name].task if name in NETWORKS else None


def parse_bits(text: str) -> tuple[int, int]:
    """``"4/8"``, ``"W4A8"`` or ``"4"`` (both) -> ``(weight_bits, act_bits)``.

    >>> parse_bits("4/8"), parse_bits("W3A3"), parse_bits("8")
    ((4, 8), (3, 3), (8, 8))
    """
    t = text.strip().upper()
    try:
        if t.startswith("W") and "A" in t:
            w, a = t[1:].split("A")
        elif "/" in t:
            w, a = t.split("/")
        else:
            w = a = t
        bits = (int(w), int(a))
    except ValueError:
        raise ConfigError(f"bits must look like W/A, e.g. 4/4, 8/4 or W4A8; got {text!r}") from None
    for b in bits:
        if not 2 <= b <= 8:
            raise ConfigError(f"bits must be from 2 to 8; got {text!r}")
    return bits
