"""The public entry points: ``explain`` and ``merge`` (``prepare``/``lower`` build on the same analysis).

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
>>> merged = merge(model)
>>> x = torch.randn(1, 3, 8, 8)
>>> bool(torch.allclose(merged(x), model(x), atol=1e-5))
True
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from .capture import capture
from .config import QConfig
from .errors import ConfigError, NotPreparedError, RepQError
from .passes.merge import merge_blocks
from .passes.prepare import prepare_graph
from .quant.fake_quant import ActFakeQuant, fake_quantizers
from .patterns.blocks import find_blocks
from .report import Report, build_report


def explain(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None) -> Report:
    """What ``merge`` would merge, with each block's branches, and why anything is left alone.

    >>> import torch.nn as nn
    >>> print(explain(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))))  # doctest: +NORMALIZE_WHITESPACE
    Sequential: 1 of 1 blocks merged into one conv each, 1 convs -> 1
    block   branches        convs  merged  reason
    <root>  conv3x3 -> bn   1      -> 3x3
    """
    gm = capture(model, example_inputs)
    return build_report(type(model).__name__, gm, find_blocks(gm))


def merge(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None) -> fx.GraphModule:
    """The float deploy model: every mergeable block as one conv (BN folded with running statistics).

    The result equals ``model.eval()``; ``model`` itself is not modified. It is returned in eval mode.
    """
    gm = capture(model, example_inputs)
    merged = merge_blocks(gm, find_blocks(gm))
    return merged.eval()


def prepare(model: torch.nn.Module, config: QConfig | None = None,
            example_inputs: Sequence[Any] | None = None) -> fx.GraphModule:
    """The RepQ QAT model: each block is ``conv2d(Q_a(x), Q_w(M(theta)), b(theta))``.

    ``M(theta)`` is the block's merged weight as FX nodes on the block's own parameters, so
    training updates the original branch parameters while the quantizer sees the deploy
    kernel. Parameter and buffer names are those of ``model``; the result follows
    ``.train()``/``.eval()`` at run time. ``model`` itself is not modified.

    >>> import torch, torch.nn as nn
    >>> qmodel = prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    >>> qmodel(torch.randn(2, 3, 8, 8)).shape
    torch.Size([2, 8, 6, 6])
    """
    config = config or QConfig()
    if not isinstance(config, QConfig):
        raise ConfigError(f"config must be a repq_fx.QConfig; got {type(config).__name__}")
    if fake_quantizers(model):
        raise RepQError(f"{type(model).__name__} is already prepared (it contains fake quantizers); "
                        "prepare the original float model instead")
    gm = capture(model, example_inputs)
    qmodel = prepare_graph(gm, config, find_blocks(gm))
    qmodel.train(model.training)
    qmodel.repq_config = config
    return qmodel


def calibrate(qmodel: torch.nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> int:
    """Initialise activation ranges from data (float activations, eval mode); returns batches seen.

    ``batches`` yields input tensors, or tuples/lists whose first item is the input.
    """
    acts = [q for q in fake_quantizers(qmodel) if isinstance(q, ActFakeQuant)]
    if not acts:
        raise NotPreparedError("calibrate() needs a model returned by repq_fx.prepare (no fake quantizers found)")
    quantizers = fake_quantizers(qmodel)
    enabled = [bool(q.enabled) for q in quantizers]
    was_training = qmodel.training
    seen = 0
    try:
        for q in quantizers:
            q.enable(False)
            q.reset()  # ranges and steps come from these batches only
        for q in acts:
            q.observing.fill_(1)
        qmodel.eval()
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                qmodel(x)
                seen += 1
                if max_batches is not None and seen >= max_batches:
                    break
    finally:
        for q in acts:
            q.observing.fill_(0)
        for q, on in zip(quantizers, enabled):
            q.enable(on)
        qmodel.train(was_training)
    if seen == 0:
        raise RepQError("calibrate() got no batches: pass an iterable of input tensors (or (input, target) tuples)")
    for q in acts:
        if torch.isfinite(q.min_val):
            q.init_from_range()
    with torch.no_grad():  # weight steps from the current weights
        qmodel.eval()
        try:
            qmodel(x)
        finally:
            qmodel.train(was_training)
    return seen


def enable_fake_quant(qmodel: torch.nn.Module) -> None:
    """Turn every fake quantizer of a prepared model on."""
    for q in fake_quantizers(qmodel):
        q.enable(True)


def disable_fake_quant(qmodel: torch.nn.Module) -> None:
    """Turn every fake quantizer of a prepared model off (the float RepQ model)."""
    for q in fake_quantizers(qmodel):
        q.enable(False)
