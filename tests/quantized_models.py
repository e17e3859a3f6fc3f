"""Shared set-up for the lowering and export tests: well-conditioned models, prepared and calibrated.

Random-init networks are *chaotic* under quantization: in timm's mobileone_s0 with BN calibrated
to unit gain, a one-step rounding difference on 0.05 % of one layer's outputs grows to tens of
steps twenty layers later (measured: 30 steps, argmax agreement 25 %). That is a property of the
random weights, not of lowering, so end-to-end comparisons use BN gains of 0.5 after calibrating
the running statistics (a contractive network, as a trained one mostly is), and the per-layer
test checks every layer of the chaotic network on identical inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

import repq_fx


def calibrate_bn(model: nn.Module, shape: tuple[int, ...], gain: float = 0.5, batches: int = 3) -> nn.Module:
    """Running BN statistics from random data (cumulative average), then BN weights times ``gain``; eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(*shape, dtype=dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.mul_(gain)
    return model.eval()


def prepared(build: Callable[[], nn.Module], shape: tuple[int, ...], config: repq_fx.QConfig | None = None,
             gain: float = 0.5, seed: int = 0) -> tuple[nn.Module, torch.fx.GraphModule]:
    """``(model, qmodel)``: the model with calibrated BN, and its prepared, calibrated RepQ model (eval)."""
    torch.manual_seed(seed)
    model = calibrate_bn(build(), shape, gain)
    qmodel = repq_fx.prepare(model, config)
    repq_fx.calibrate(qmodel, [torch.randn(*shape) for _ in range(3)])
    return model, qmodel.eval()


def output_step(lowered: torch.fx.GraphModule) -> float:
    """The quantization step of the model output (the last activation quantizer)."""
    from repq_fx.quant.lowered import QuantizeDequantize

    qdq = [n for n in lowered.graph.nodes
           if n.op == "call_module" and isinstance(lowered.get_submodule(n.target), QuantizeDequantize)]
    return float(lowered.get_submodule(qdq[-1].target).scale)


def trained_small_repvgg(target: str | None = None, steps: int = 3) -> torch.fx.GraphModule:
    """A small RepVGG (3 blocks) prepared for ``target`` (default: the default target), calibrated and trained a
    few SGD steps on random data, lowered: what the runtime tests export."""
    from repq_fx.testing.blocks import RepVGGNet

    config = repq_fx.QConfig() if target is None else repq_fx.QConfig(target=target)
    _, qmodel = prepared(lambda: RepVGGNet(widths=(8, 16, 32), blocks_per_stage=1), (8, 1, 28, 28), config)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
    qmodel.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(qmodel(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return repq_fx.lower(qmodel.eval())
