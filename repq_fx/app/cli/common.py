"""What several commands build: the input size of a model, and its quantized form (from a
``repq-fx train`` checkpoint, or prepared and calibrated on random batches).

>>> _example_size("examples:ECBSR"), _example_size("timm:repvgg_a0")
((1, 32, 32), None)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn as nn

from ...config import QConfig
from ...errors import RepQError

if TYPE_CHECKING:
    from ..train import TrainConfig


def _default_size(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def _example_size(spec: str) -> tuple[int, ...] | None:
    """The input size an ``examples:NAME`` network registers; None for other specs."""
    from ..networks import NETWORKS

    prefix, _, name = spec.partition(":")
    return NETWORKS[name].input_size if prefix == "examples" and name in NETWORKS else None


def _restore_quantized(path: str, model: str, command: str) -> tuple[nn.Module, TrainConfig]:
    """The quantized model of a `repq-fx train` checkpoint, and the run's config; a float one is an error."""
    from ..train import TrainConfig, restore

    qmodel, ckpt = restore(path, model)
    saved = TrainConfig.from_dict(ckpt["config"])
    if not saved.quantized:
        raise RepQError(f"{path} is a float (fp) checkpoint; {command} needs a quantized one: train it with "
                        f"`repq-fx train {model} --method repq-bn --from {path} --out q.pt` first")
    return qmodel, saved


def _data_size(saved: TrainConfig) -> tuple[int, ...]:
    """The input shape (without the batch) of the model of a `repq-fx train` run: its data's images, with
    as many channels as the model's first conv takes (a torchvision model on Fashion-MNIST: 3)."""
    from ..train import model_input_size

    return model_input_size(saved)


def _calibrated(model: nn.Module, config: QConfig, size: tuple[int, ...], batches: int, batch: int = 4,
                example: tuple[torch.Tensor, ...] | None = None, capture: str = "auto") -> fx.GraphModule:
    """``repq_fx.prepare(model, config)``, calibrated on ``batches`` random batches of ``batch`` inputs."""
    import repq_fx

    qmodel = repq_fx.prepare(model, config, example, capture=capture)
    repq_fx.calibrate(qmodel, [torch.randn(batch, *size) for _ in range(batches)])
    return qmodel
