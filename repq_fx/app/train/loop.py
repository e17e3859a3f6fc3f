"""The training loop and evaluation: optimizer and learning-rate schedule, one epoch of training
steps (mixed precision optional), top-1 and PSNR.

>>> opt = make_optimizer(nn.Linear(3, 2), TrainConfig(model="m:N"))
>>> type(opt).__name__, type(cosine_schedule(opt, 10)).__name__
('SGD', 'LambdaLR')
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...errors import RepQError
from .config import AMP_DTYPES, TrainConfig


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
    from ...quant.fake_quant import fake_quantizers

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
    from ..data.sr import psnr_y

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
