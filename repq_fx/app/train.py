"""Training and evaluation for the ``repq-fx train`` / ``eval`` commands and the benchmarks.

A run is described by a :class:`TrainConfig` (model spec, data, method, bits, schedule).
:func:`build_model` turns it into the module to train:

- ``fp``: the model itself, in float;
- ``repq-bn`` / ``repq-bnest``: ``repq_fx.prepare(model, QConfig(bits, bn_mode="batch" /
  "estimate"))``, the RepQ QAT model (fake quant on each block's merged weight);
- ``lsq``: ``repq_fx.merge(model)`` first (BN folded with running statistics), then LSQ QAT
  of the merged convs: the RepQ paper's "merge then QAT" baseline;
- ``ptq``: ``merge`` then min-max fake quant, calibrated and not trained.

Quantized runs start from a float checkpoint (``from_ckpt``) and calibrate the activation
ranges on a few training batches before training. The optimizer is SGD with momentum 0.9
(weight decay on conv/linear weights only, not on BN, biases or quantizer steps) and a
cosine learning rate stepped every batch down to 0; Adam is available for SR.

Checkpoints are dicts of tensors and plain data, written atomically (temp file in the same
folder, fsync, ``os.replace``) and read with ``torch.load(..., weights_only=True)``:
``{"format", "model", "optimizer", "scheduler", "epoch", "config", "metrics"}``. A damaged
or mismatched checkpoint raises :class:`~repq_fx.errors.CheckpointError`. Each epoch's
shuffling and augmentation are seeded by ``(seed, epoch)``, so a resumed run repeats
exactly what an uninterrupted one would have done.

>>> cfg = TrainConfig(model="examples:RepVGGNet", method="repq-bn", bits=(4, 4))
>>> cfg.qconfig().bn_mode, cfg.qconfig().weight_bits
('batch', 4)
"""
from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..config import QConfig
from ..targets import DEFAULT_TARGET, LEGACY_TARGET, TARGETS
from ..errors import CheckpointError, ConfigError, RepQError

__all__ = [
    "CHECKPOINT_FORMAT", "DATASETS", "METHODS", "TrainConfig", "build_model", "cosine_schedule", "data_note",
    "evaluate", "float_model",
    "evaluate_classifier", "evaluate_sr", "fit_options", "input_channels", "load_checkpoint", "make_datasets",
    "make_loaders", "make_optimizer", "make_test_loader", "model_input_size", "parse_bits",
    "restore", "run_eval", "run_training", "save_checkpoint", "train_one_epoch",
]

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
        from .data.kinds import canonical_data, data_kind, parse_data

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
        from .data.kinds import data_kind

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
        from .data.kinds import FOLDER_INPUT_SIZE, parse_data

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
    from .networks import NETWORKS

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


# ---------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------

def build_model(config: TrainConfig, float_state: dict[str, Tensor] | None = None, *,
                sync_bn: bool = False) -> nn.Module:
    """The module a run trains: the float model (with ``float_state`` loaded, if given), or its
    quantized form for the config's method (see the module docstring). Not calibrated.
    ``sync_bn``: BNs normalize with the statistics of the global batch in a process group: ``fp``
    converts them to ``nn.SyncBatchNorm`` (same state_dict keys), quantized methods mark the prepared
    model's BNs (:func:`repq_fx.quant.sync_stats.mark_sync_batch_norm`; DDP refuses SyncBatchNorm on the CPU).

    >>> build_model(TrainConfig(model="examples:RepVGGNet", method="lsq")).__class__.__name__
    'GraphModule'
    """
    import repq_fx

    model = float_model(config)
    if float_state is not None:
        _load_state(model, float_state, config.from_ckpt or "the float checkpoint")
    if not config.quantized:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model
    if config.method in ("lsq", "ptq"):
        model = repq_fx.merge(model.eval())
    qmodel = repq_fx.prepare(model, config.qconfig())
    if sync_bn:
        from ..quant.sync_stats import mark_sync_batch_norm

        mark_sync_batch_norm(qmodel)
    return qmodel.train()


FASHION_MNIST_CLASSES, FASHION_MNIST_SIZE = 10, (1, 28, 28)

# prefix -> the factory options that build a classifier of `classes` classes on `channels`-channel images;
# specs of other prefixes are built without arguments and must fit as they are
FIT_OPTIONS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "timm": lambda classes, channels: {"num_classes": classes, "in_chans": channels},
    "torchvision": lambda classes, channels: {"num_classes": classes},  # 3 channels: grey is repeated
    "examples": lambda classes, channels: {"num_classes": classes, "in_channels": channels},
}


def fit_options(config: TrainConfig) -> dict[str, Any]:
    """The options ``config.model``'s factory gets to fit the data (:data:`FIT_OPTIONS`): the data's
    number of classes and channels for timm, torchvision and example classification networks; none
    for other specs, for SR data, and for checkpoints written before ``fit_data``.

    >>> fit_options(TrainConfig(model="timm:repvgg_a0", data="imagefolder:pets", classes=("cat", "dog")))
    {'num_classes': 2, 'in_chans': 3}
    >>> fit_options(TrainConfig(model="examples:ECBSR", data="sr"))
    {}
    """
    from .data.kinds import data_shape

    prefix = config.model.partition(":")[0]
    if not config.fit_data or prefix not in FIT_OPTIONS:
        return {}
    if prefix == "examples" and _example_task(config.model) != "classification":
        return {}  # block classes and the SR network are built as they are
    classes, size = data_shape(config)
    return {} if classes is None else FIT_OPTIONS[prefix](classes, size[0])


def _data_label(config: TrainConfig) -> str:
    return "Fashion-MNIST" if config.data == "fashion-mnist" else config.data


def float_model(config: TrainConfig) -> nn.Module:
    """The float model of ``config.model``, fitted to the data.

    With ``fit_data`` (the default) on classification data a timm spec is built with the data's
    ``num_classes`` and ``in_chans``, a torchvision spec with ``num_classes`` (its grey input is
    repeated to the 3 channels it takes, see :func:`data_note`), an example network with
    ``num_classes`` and ``in_channels`` (:func:`fit_options`); any model must then map a batch of
    the data's images (3 channels when the data is grey and its first conv takes 3) to as many
    logits as there are classes, or :class:`~repq_fx.errors.ConfigError` says why it cannot train
    on the data. Checkpoints written before ``fit_data`` rebuild the factory's defaults (1000
    classes, 3 channels).

    >>> float_model(TrainConfig(model="examples:RepVGGNet")).linear.out_features
    10
    >>> net = float_model(TrainConfig(model="examples:RepVGGNet", data="imagefolder:pets", classes=("cat", "dog")))
    >>> net.linear.out_features, net.stages[0][0].in_channels
    (2, 3)
    """
    from .data.kinds import data_shape
    from .models import resolve_model

    options = fit_options(config)
    try:
        model = resolve_model(config.model, **options)
    except RepQError as e:
        classes, size = data_shape(config)
        raise ConfigError(f"{e}; {config.model} cannot be fitted to the {classes} classes of "
                          f"{'x'.join(map(str, size))} images of {_data_label(config)}") from None
    if config.fit_data and config.task == "classification":
        _check_fits(model, config)
    return model


def _check_fits(model: nn.Module, config: TrainConfig) -> None:
    """``model`` maps 2 of the data's images to ``[2, classes]`` logits, or a ConfigError says why not."""
    from .data.kinds import data_shape

    classes, (channels, h, w) = data_shape(config)
    spec, label = config.model, _data_label(config)
    takes = input_channels(model)
    if takes is not None and takes != channels and not (channels == 1 and takes == 3):
        hint = ("pass --input-size 1xHxW to train on grey images" if takes == 1 else
                "give it a first conv of 1 or 3 channels")
        raise ConfigError(f"{spec}'s first conv takes {takes} channel{'s' * (takes != 1)}; the images of {label} "
                          f"have {channels}: {hint}")
    channels = takes or channels
    x = torch.zeros(2, channels, h, w)
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = "pick a model that takes small images" if config.data == "fashion-mnist" else \
            f"pick another --input-size or a model that takes {h}x{w} images"
        raise ConfigError(f"{spec} cannot run on {label}'s {channels}x{h}x{w} images ({type(e).__name__}: "
                          f"{first}); {hint}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, classes):
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"{spec} maps a batch of 2 {label} images to {shape}, not [2, {classes}] logits: give it "
                          f"a {classes}-class head (a model built without arguments keeps its own; timm, torchvision "
                          f"and example network specs get num_classes={classes})")


def data_note(config: TrainConfig) -> str | None:
    """What fitting the model to the data changed, for the run's log (None if nothing, or if an
    example network is built as registered, for Fashion-MNIST).

    >>> data_note(TrainConfig(model="torchvision:resnet18"))
    'note: torchvision:resnet18 built with num_classes=10 for Fashion-MNIST; its first conv takes 3 channels, so each grey image is repeated 3 times'
    >>> data_note(TrainConfig(model="examples:RepVGGNet", data="imagefolder:/pets", classes=("cat", "dog")))
    'note: examples:RepVGGNet built with num_classes=2, in_channels=3 for imagefolder:/pets (classes: cat, dog)'
    """
    from .data.kinds import data_shape

    prefix = config.model.partition(":")[0]
    if not config.fit_data and config.data == "fashion-mnist" and prefix in ("timm", "torchvision"):
        return (f"note: {config.model} as its factory builds it (a checkpoint from before fit_data); grey images "
                "are repeated to its input channels")
    options = fit_options(config)
    if not options or (prefix == "examples" and config.data == "fashion-mnist"):
        return None
    note = f"note: {config.model} built with {', '.join(f'{k}={v}' for k, v in options.items())} for " \
           f"{_data_label(config)}"
    if config.classes:
        shown = ", ".join(config.classes[:8]) + (", ..." if len(config.classes) > 8 else "")
        note += f" (classes: {shown})"
    if prefix == "torchvision" and data_shape(config)[1][0] == 1:
        note += "; its first conv takes 3 channels, so each grey image is repeated 3 times"
    return note


def _load_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        detail = "; ".join(lines)[:600]
        raise CheckpointError(f"{source} does not fit this model ({detail}); was it written for another "
                              "model or method?") from None


def input_channels(model: nn.Module) -> int | None:
    """``in_channels`` of the first conv module (None if there is none).

    >>> input_channels(nn.Sequential(nn.Conv2d(3, 4, 1)))
    3
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------

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
    from .data.kinds import data_kind

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
    from .data.kinds import data_kind

    config = config.resolved()
    kind, seed = data_kind(config.data), _data_seed(config, epoch)
    train, test = make_datasets(config, epoch)
    return kind.loader(train, config, True, seed), kind.loader(test, config, False, seed)


def make_test_loader(config: TrainConfig) -> Iterable:
    """The test loader of :func:`make_loaders` alone (an image folder's ``val/`` only: no ``train/`` needed).

    >>> len(make_test_loader(TrainConfig(model="examples:RepVGGNet", test_subset=1000)))   # doctest: +SKIP
    2
    """
    from .data.kinds import data_kind

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
    from .data.kinds import data_shape

    _, size = data_shape(config)
    if config.task == "sr":
        return tuple(size)
    return ((input_channels(float_model(config)) or size[0]), *size[1:])


# ---------------------------------------------------------------------------
# Optimisation.
# ---------------------------------------------------------------------------

def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or Adam; weight decay only on parameters of 2 or more dimensions
    (conv and linear weights), not on BN, biases, PReLU slopes or quantizer steps.

    The learned LSQ steps get their own group at ``lr * step_lr_scale``. With SGD the scale is 1:
    LSQ's gradient scale ``1/sqrt(N * Qp)`` already sizes their updates. Adam divides that scale
    out and moves every parameter by about ``lr`` per step, which for an 8-bit step of ~0.004 is a
    2.5 % change per step at lr 1e-4; hence Adam's smaller default scale (the measurements behind it:
    benchmarks/RESULTS.md, "Performance history (moved from docstrings)").

    >>> opt = make_optimizer(nn.Linear(3, 2), TrainConfig(model="m:N", weight_decay=1e-4))
    >>> [g["weight_decay"] for g in opt.param_groups], opt.defaults["momentum"]
    ([0.0001, 0.0], 0.9)
    """
    from ..quant.fake_quant import fake_quantizers

    config = config.resolved()
    steps = [q.scale for q in fake_quantizers(model) if q.learned and q.scale.requires_grad]
    step_ids = {id(p) for p in steps}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in step_ids]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if steps:
        groups.append({"params": steps, "weight_decay": 0.0, "lr": config.lr * config.step_lr_scale})
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr(t) = lr0 * (1 + cos(pi * t / total_steps)) / 2``, stepped after every batch (0 at the end).

    >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> sched = cosine_schedule(opt, 4)
    >>> lrs = []
    >>> for _ in range(4): opt.step(); sched.step(); lrs.append(round(opt.param_groups[0]["lr"], 4))
    >>> lrs
    [0.8536, 0.5, 0.1464, 0.0]
    """
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))


def _progress(iterable: Iterable, desc: str, enabled: bool, total: int | None = None) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the dev extra
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, unit="batch", dynamic_ncols=True)


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, loss_fn: Callable[[Tensor, Tensor], Tensor],
                    *, device: torch.device | str = "cpu", desc: str = "train", progress: bool = True,
                    input_transform: Callable[[Tensor], Tensor] | None = None, amp: str | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> float:
    """One pass over ``loader`` in train mode; returns the mean loss. The scheduler steps per batch.
    A non-finite loss raises :class:`~repq_fx.errors.RepQError` (lower the learning rate).
    ``amp`` (``"bf16"``/``"fp16"``): forward and loss under ``torch.autocast`` in that dtype (the
    fake quantizers and merged weights stay float32, see :mod:`repq_fx.quant.precision`);
    ``scaler``: a ``torch.amp.GradScaler`` that scales the loss (fp16).

    >>> model = nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> batches = [(torch.ones(4, 2), torch.zeros(4, 1))] * 3
    >>> train_one_epoch(model, batches, opt, None, F.mse_loss, progress=False) >= 0
    True
    """
    model.train()
    total, count = 0.0, 0
    bar = _progress(loader, desc, progress, total=_len(loader))
    for x, y in bar:
        x, y = x.to(device), y.to(device)
        if input_transform is not None:
            x = input_transform(x)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=AMP_DTYPES.get(amp or "", torch.bfloat16),
                            enabled=amp is not None):
            loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise RepQError(f"the training loss became {loss.item()} after {count} batches of {desc}; "
                            "lower the learning rate (--lr)")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(x)
        count += len(x)
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    return total / max(count, 1)


def _len(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Iterable, *, device: torch.device | str = "cpu",
                        progress: bool = False, input_transform: Callable[[Tensor], Tensor] | None = None) -> float:
    """Top-1 accuracy in percent, in eval mode.

    >>> model = nn.Linear(2, 2, bias=False); _ = model.weight.data.copy_(torch.eye(2))
    >>> evaluate_classifier(model, [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))])
    50.0
    """
    model.eval()
    correct, count = 0, 0
    for x, y in _progress(loader, "eval", progress, total=_len(loader)):
        x, y = x.to(device), y.to(device)
        if input_transform is not None:
            x = input_transform(x)
        correct += (model(x).argmax(dim=1) == y).sum().item()
        count += len(y)
    return 100.0 * correct / max(count, 1)


@torch.no_grad()
def evaluate_sr(model: nn.Module, loader: Iterable, scale: int, *, device: torch.device | str = "cpu",
                progress: bool = False) -> float:
    """Mean PSNR (dB, Y channel, border of ``scale`` cropped; :func:`repq_fx.app.data.sr.psnr_y`) over
    the test images, in eval mode.

    >>> up = nn.Upsample(scale_factor=2, mode="nearest")
    >>> hr = torch.zeros(1, 1, 8, 8); hr[..., ::2, :] = 0.5; hr[..., 1::2, :] = 0.5
    >>> round(evaluate_sr(up, [(hr[..., ::2, ::2], hr)], scale=2), 1)
    inf
    """
    from .data.sr import psnr_y

    model.eval()
    values = []
    for lr, hr in _progress(loader, "eval", progress, total=_len(loader)):
        values.append(psnr_y(model(lr.to(device)).cpu(), hr, scale))
    return sum(values) / max(len(values), 1)


def evaluate(model: nn.Module, config: TrainConfig, test_loader: Iterable, *, device: torch.device | str = "cpu",
             progress: bool = False, input_transform: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """``{"top1": %}`` for classification or ``{"psnr": dB}`` for SR.

    >>> evaluate(nn.Flatten(), TrainConfig(model="m:N"), [(torch.eye(3), torch.arange(3))])
    {'top1': 100.0}
    """
    if config.task == "sr":
        return {"psnr": evaluate_sr(model, test_loader, config.scale, device=device, progress=progress)}
    return {"top1": evaluate_classifier(model, test_loader, device=device, progress=progress,
                                        input_transform=input_transform)}


def _channel_adapter(config: TrainConfig) -> Callable[[Tensor], Tensor] | None:
    """Grey images into a model whose first conv wants 3 channels (torchvision, or a model built without
    arguments): repeat them."""
    from .data.kinds import data_shape

    if config.task != "classification" or data_shape(config)[1][0] != 1:
        return None
    if input_channels(float_model(config)) == 3:
        return lambda x: x.expand(-1, 3, -1, -1)
    return None


# ---------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------

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
    from .data.kinds import canonical_data

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
    from .data.kinds import data_shape

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


# ---------------------------------------------------------------------------
# Whole runs.
# ---------------------------------------------------------------------------

def run_training(config: TrainConfig, out: str | os.PathLike[str], *, resume: bool = False,
                 overwrite: bool = False, device: str = "cpu", progress: bool = True,
                 log: Callable[[str], None] = print, compile: bool = False, amp: str | None = None,
                 sync_bn: bool = False) -> dict[str, Any]:
    """Train (or, for ``ptq``, calibrate) ``config`` and write the checkpoint ``out`` after every
    epoch; returns the final metrics. ``resume`` continues from ``out`` if it exists (the config
    must be the same run); an existing ``out`` without ``resume`` needs ``overwrite``.
    ``compile`` runs the training steps through ``repq_fx.compile`` (static shapes: a smaller last
    batch compiles once more); evaluation and checkpoints use the same module uncompiled. It changes
    the speed, not the run (not part of the config, so a run may resume either way).
    ``amp`` (``"bf16"`` or ``"fp16"``, with a ``GradScaler``): mixed precision, see
    :func:`train_one_epoch`.

    Inside a process group of N > 1 processes (``torchrun``, see :mod:`repq_fx.app.distributed`) the
    model trains under ``DistributedDataParallel`` and each process reads its own shard of the
    training set (``DistributedSampler``, ``set_epoch`` per epoch): ``batch_size`` is per process,
    the global batch is N times it, and the learning rate is not scaled. Every rank calibrates the
    quantizers on the same batches (the first ``calib_batches`` global batches of the unsharded set,
    exactly the calibration of a one-process run at the global batch size), so their state agrees
    without communication; DDP's constructor then broadcasts rank 0's parameters and buffers all
    the same. After that DDP averages the gradients, so parameters (LSQ steps included) stay equal
    on all ranks; buffers are re-broadcast from rank 0 at every forward (DDP's default), so BN
    running statistics behave as ``nn.BatchNorm2d``'s under DDP: each forward normalizes with its own
    process's batch, and the statistics kept are rank 0's. Rank 0 alone logs, shows progress,
    evaluates and writes ``out``; every rank reads it on ``resume``, which needs the same number of
    processes (the global batch sets the schedule). ``sync_bn``: the BNs become ``nn.SyncBatchNorm``
    before ``prepare``, and normalize with the statistics of the global batch, those inside RepQ
    blocks included (:mod:`repq_fx.quant.sync_stats`; ``fp`` runs torch's own, CUDA only).

    >>> run_training(TrainConfig(model="examples:RepVGGNet", epochs=1, subset=512), "fp.pt")   # doctest: +SKIP
    epoch 1/1  loss 1.6012  top-1 45.20 %  lr 0.00e+00  3.1 s
    saved fp.pt
    {'epoch': 1, 'loss': 1.6012, 'seconds': 3.1, 'top1': 45.2}
    """
    from . import distributed
    from .data.kinds import data_classes

    out = Path(out)
    config = config.resolved()
    if config.classes is None:
        config = replace(config, classes=data_classes(config))  # an image folder's classes (its folders only)
    world, main = distributed.world_size(), distributed.is_main()
    if amp is not None and amp not in AMP_DTYPES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_DTYPES)}; got {amp!r}")
    _check_sync_bn(config, sync_bn, device, world)
    if not main:
        log, progress = (lambda _text: None), False
    torch.manual_seed(config.seed)
    ckpt = None
    if resume and out.exists():
        ckpt = load_checkpoint(out)
        saved = TrainConfig.from_dict(ckpt["config"])
        _check_resumable(out, saved, config)
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world != world:
            raise CheckpointError(f"cannot resume {out} with {world} process(es): it was trained with {saved_world} "
                                  f"(global batch {saved_world} x {config.batch_size}); start it as it was started")
        config = replace(config, fit_data=saved.fit_data)  # the model it was built as
    elif out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass --resume to continue that run, or --overwrite to replace it")
    elif resume:
        log(f"no checkpoint at {out} yet: starting from scratch")
    distributed.barrier()  # every rank has looked at out before rank 0 writes it

    train_loader, test_loader = make_loaders(config, epoch=0)
    steps_per_epoch = _len(distributed.shard_loader(train_loader, 0, config.seed)) or 1
    if ckpt is not None:
        model = build_model(config, sync_bn=sync_bn)
        _load_state(model, ckpt["model"], str(out))
    else:
        float_state = None
        if config.from_ckpt:
            source = load_checkpoint(config.from_ckpt)
            saved = TrainConfig.from_dict(source["config"])
            if saved.method != "fp" or saved.model != config.model:
                raise CheckpointError(f"--from {config.from_ckpt} must be a float (method fp) checkpoint of "
                                      f"{config.model}; it is method {saved.method!r} of {saved.model!r}")
            _check_same_classes(config.from_ckpt, saved, config)
            float_state = source["model"]
            config = replace(config, fit_data=saved.fit_data)  # the model the float run built
        elif config.quantized:
            log("note: quantizing a randomly initialised model; pass --from FP_CKPT to start from trained weights")
        model = build_model(config, float_state, sync_bn=sync_bn)
        note = data_note(config)
        if note:
            log(note)
    model.to(device)
    adapter = _channel_adapter(config)
    if ckpt is None and config.quantized:
        import repq_fx

        # every rank: the same batches, those of one process at the global batch size
        calib_loader = train_loader if world == 1 else make_loaders(
            replace(config, batch_size=config.batch_size * world), epoch=0)[0]
        calibration = _progress(islice(calib_loader, config.calib_batches), "calibrate", progress,
                                total=min(config.calib_batches, _len(calib_loader) or config.calib_batches))
        batches = ((adapter(x) if adapter else x).to(device) for x, _ in calibration)
        repq_fx.calibrate(model, batches)

    optimizer = make_optimizer(model, config)
    scheduler = cosine_schedule(optimizer, steps_per_epoch * config.epochs)
    scaler = torch.amp.GradScaler(torch.device(device).type) if amp == "fp16" else None
    start_epoch, history = 0, []
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{out}: the optimizer state does not fit this run ({e})") from None
        start_epoch, history = int(ckpt["epoch"]), list(ckpt.get("metrics", {}).get("history", []))
        log(f"resuming {out} after epoch {start_epoch}/{config.epochs}")

    loss_fn = F.l1_loss if config.task == "sr" else F.cross_entropy
    stepped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        index = torch.device(device).index
        stepped = DistributedDataParallel(model, device_ids=None if index is None else [index])
        log(f"DistributedDataParallel over {world} processes: batch {config.batch_size} per process, "
            f"global batch {world * config.batch_size}")
    if compile and start_epoch < config.epochs:
        from ..compiling import compile as compile_model

        stepped = compile_model(stepped, dynamic=False)
        log("training steps compiled with repq_fx.compile: the first batch compiles (seconds to minutes)")
    for epoch in range(start_epoch, config.epochs):
        train_loader, _ = make_loaders(config, epoch=epoch)
        train_loader = distributed.shard_loader(train_loader, epoch, config.seed)
        start = time.perf_counter()
        loss = train_one_epoch(stepped, train_loader, optimizer, scheduler, loss_fn, device=device,
                               desc=f"epoch {epoch + 1}/{config.epochs}", progress=progress,
                               input_transform=adapter, amp=amp, scaler=scaler)
        loss = distributed.all_mean(loss, device)
        seconds = time.perf_counter() - start
        entry = None
        if main:
            entry = {"epoch": epoch + 1, "loss": loss, "seconds": seconds,
                     **evaluate(model, config, test_loader, device=device, progress=progress,
                                input_transform=adapter)}
            _save_run(out, model, optimizer, scheduler, epoch + 1, config, history + [entry], world, scaler)
        history.append(distributed.broadcast_object(entry))
        log(f"epoch {epoch + 1}/{config.epochs}  loss {loss:.4f}  {_metric_text(history[-1])}  "
            f"lr {optimizer.param_groups[0]['lr']:.2e}  {seconds:.1f} s")
    if not history:  # ptq or --epochs 0: the calibrated model as it is
        entry = None
        if main:
            entry = {"epoch": 0, **evaluate(model, config, test_loader, device=device, progress=progress,
                                            input_transform=adapter)}
            _save_run(out, model, optimizer, scheduler, 0, config, [entry], world, scaler)
        history.append(distributed.broadcast_object(entry))
        log(f"{config.method} {config.bits[0]}/{config.bits[1]} without training: {_metric_text(history[-1])}")
    elif start_epoch >= config.epochs:
        log(f"{out} has finished all {config.epochs} epochs: {_metric_text(history[-1])}")
    log(f"saved {out}")
    return dict(history[-1])


def _check_sync_bn(config: TrainConfig, sync_bn: bool, device: str, world: int) -> None:
    """``sync_bn`` where it can work: a float model runs torch's own SyncBatchNorm, which needs CUDA in
    a process group; quantized models synchronise through ``repq_fx.quant.sync_stats`` on any device."""
    if sync_bn and not config.quantized and world > 1 and torch.device(device).type != "cuda":
        raise ConfigError("--sync-bn with --method fp uses torch.nn.SyncBatchNorm, which torch runs on CUDA only; "
                          "drop it on the CPU (each process then normalizes with its own batch, as "
                          "nn.BatchNorm2d under DDP)")


def _save_run(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, config: TrainConfig,
              history: list[dict[str, Any]], world_size: int = 1,
              scaler: torch.amp.GradScaler | None = None) -> None:
    save_checkpoint(out, {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": config.to_dict(),
        "metrics": {"history": history, **(history[-1] if history else {})},
        "torch_version": str(torch.__version__),
        "world_size": world_size,  # processes of the run (its global batch is world_size x batch_size)
        **({"scaler": scaler.state_dict()} if scaler is not None else {}),
    })


def _metric_text(metrics: dict[str, Any]) -> str:
    if "psnr" in metrics:
        return f"PSNR {metrics['psnr']:.2f} dB"
    if "top1" in metrics:
        return f"top-1 {metrics['top1']:.2f} %"
    return ""


def run_eval(path: str | os.PathLike[str], model_spec: str | None = None, data: str | None = None, *,
             device: str = "cpu", progress: bool = True, test_subset: int | None = None,
             workers: int = 0) -> dict[str, float]:
    """Evaluate the checkpoint ``path`` on the test set of its data (``test_subset``: the first
    images only; an image folder's ``val/``); ``model_spec``, if given, must match the checkpoint.
    ``data``, if given, must be the checkpoint's, except that a folder may be another folder of
    the same kind (for an image folder, one whose ``val/`` classes the model knows).
    Returns ``{"top1": %}`` or ``{"psnr": dB}``.

    >>> run_eval("fp.pt", "examples:RepVGGNet")   # doctest: +SKIP
    {'top1': 92.5}
    """
    from .data.kinds import canonical_data, parse_data
    from ..errors import DatasetNotFoundError

    model, ckpt = restore(path, model_spec)
    saved = TrainConfig.from_dict(ckpt["config"])
    if data is not None:
        data = canonical_data(data)
        (kind, folder), saved_kind = parse_data(data), parse_data(saved.data)[0]
        if data != saved.data and (folder is None or kind != saved_kind):
            raise CheckpointError(f"checkpoint {path} was trained with data {saved.data!r}, not {data!r}")
    evaluated = replace(saved, data=data or saved.data, test_subset=test_subset, workers=workers)
    model.to(device)
    try:
        test_loader = make_test_loader(evaluated)
    except DatasetNotFoundError as e:
        if parse_data(evaluated.data)[1] is None:
            raise
        raise DatasetNotFoundError(f"{e}; to evaluate {path} on a folder elsewhere, pass --data "
                                   f"{parse_data(evaluated.data)[0]}:DIR") from None
    return evaluate(model, evaluated, test_loader, device=device, progress=progress,
                    input_transform=_channel_adapter(evaluated))
