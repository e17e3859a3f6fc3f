"""Whole runs: :func:`run_training` (float training, QAT or PTQ; one process or a ``torchrun``
process group) writing a checkpoint every epoch, and :func:`run_eval` of a checkpoint.

>>> _metric_text({"top1": 91.234})
'top-1 91.23 %'
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import CheckpointError, ConfigError
from .checkpoints import _check_resumable, _check_same_classes, load_checkpoint, restore, save_checkpoint
from .config import AMP_DTYPES, CHECKPOINT_FORMAT, TrainConfig
from .loaders import make_loaders, make_test_loader
from .loop import _len, _progress, cosine_schedule, evaluate, make_optimizer, train_one_epoch
from .model import _channel_adapter, _load_state, build_model, data_note


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
    from .. import distributed
    from ..data.kinds import data_classes

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
        from ...compiling import compile as compile_model

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
    from ..data.kinds import canonical_data, parse_data
    from ...errors import DatasetNotFoundError

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
