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

One module per part: :mod:`~repq_fx.app.train.config` (:class:`TrainConfig`, :func:`parse_bits`),
:mod:`~repq_fx.app.train.model` (the model fitted to the data, quantized for the method),
:mod:`~repq_fx.app.train.loaders` (datasets and loaders), :mod:`~repq_fx.app.train.loop` (optimizer,
schedule, one epoch, evaluation), :mod:`~repq_fx.app.train.checkpoints` and :mod:`~repq_fx.app.train.run`
(:func:`run_training`, :func:`run_eval`); this package gathers their public names.

>>> cfg = TrainConfig(model="examples:RepVGGNet", method="repq-bn", bits=(4, 4))
>>> cfg.qconfig().bn_mode, cfg.qconfig().weight_bits
('batch', 4)
"""
from __future__ import annotations

from .checkpoints import load_checkpoint, restore, save_checkpoint
from .config import CHECKPOINT_FORMAT, DATASETS, METHODS, TrainConfig, parse_bits
from .loaders import make_datasets, make_loaders, make_test_loader, model_input_size
from .loop import cosine_schedule, evaluate, evaluate_classifier, evaluate_sr, make_optimizer, train_one_epoch
from .model import build_model, data_note, fit_options, float_model, input_channels
from .run import run_eval, run_training

__all__ = [
    "CHECKPOINT_FORMAT", "DATASETS", "METHODS", "TrainConfig", "build_model", "cosine_schedule", "data_note",
    "evaluate", "float_model",
    "evaluate_classifier", "evaluate_sr", "fit_options", "input_channels", "load_checkpoint", "make_datasets",
    "make_loaders", "make_optimizer", "make_test_loader", "model_input_size", "parse_bits",
    "restore", "run_eval", "run_training", "save_checkpoint", "train_one_epoch",
]
