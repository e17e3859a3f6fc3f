"""Learned steps for data without a range: a quantizer that saw only zeros.

A zero-initialised BatchNorm gamma (timm's ``zero_init_last``: resnet18d, regnetx) or a layer-scale
branch at init makes a merged weight, or the activation read after it, exactly zero at calibration
(or below :data:`~repq_fx.quant.fake_quant.STEP_FLOOR` per step: a layer scale of 1e-6). Its range
gives the step 0, and torch.ao's observers answer with their ``eps`` (``MinMaxObserver``:
``scale = max(scale, torch.finfo(torch.float32).eps)``), which suits a step recomputed at every
call. An LSQ step is learned from there instead: once the gamma moves, every value lies far outside
a grid of ``qmax * eps``, the straight-through estimator passes no gradient to them (the gamma stops
learning) and the step's own gradient is too small to catch up under SGD; ``lower`` and
``export_onnx`` then write that step.

So a learned step below the floor takes a step of neighbouring data (:func:`fill_steps`): the
median step of the other channels of the same weight; where the whole tensor had no range, the
median step of the model's other quantizers of the same kind and grid (``repq_fx.calibrate``), or,
before any other quantizer has a step, the step of a unit range. Each one is reported with a
:class:`~repq_fx.errors.ZeroRangeWarning` naming the quantizer (one warning per ``calibrate``).

>>> fill_steps(torch.tensor([0.02, 0.0, 0.04, 1e-38]), floor=1e-7, default=0.5)
(tensor([0.0200, 0.0300, 0.0400, 0.0300]), 2)
>>> fill_steps(torch.zeros(2), floor=1e-7, default=0.5)
(tensor([0.5000, 0.5000]), 2)
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch

from ..errors import ZeroRangeWarning, first_few

_collected: list[list[str]] = []  # open collections (calibrate), innermost last


def fill_steps(steps: torch.Tensor, floor: float, default: float) -> tuple[torch.Tensor, int]:
    """``steps`` with every step below ``floor`` replaced by the median of the others (``default`` if none
    is at or above it), and how many were replaced."""
    low = ~(steps >= floor)  # NaN counts as low
    count = int(low.sum())
    if not count:
        return steps, 0
    good = steps[~low]
    fill = float(good.float().quantile(0.5)) if good.numel() else default
    return torch.where(low, torch.full_like(steps, fill), steps), count


def report(path: str, what: str) -> None:
    """Report that quantizer ``path`` had no range in ``what``: collected by :func:`collected`, or warned now."""
    line = f"{path}: {what}"
    if _collected:
        _collected[-1].append(line)
        return
    warnings.warn(message([line]), ZeroRangeWarning, stacklevel=4)


@contextlib.contextmanager
def collected() -> Iterator[list[str]]:
    """Collect the reports made inside (``calibrate`` warns once, with all of them)."""
    lines: list[str] = []
    _collected.append(lines)
    try:
        yield lines
    finally:
        _collected.remove(lines)


def message(lines: list[str]) -> str:
    """The :class:`ZeroRangeWarning` text for the reported ``lines``."""
    shown = first_few(lines, 8)
    return (f"{len(lines)} quantizer{'s' if len(lines) != 1 else ''} saw data without a range (all zeros, e.g. a "
            f"zero-initialised BatchNorm gamma or layer scale), which gives no step: {shown}. They start from "
            "the step of neighbouring data so that training can move them (a step of eps would stay stuck). "
            "What to do: nothing if those weights or activations are meant to start at zero; otherwise "
            "calibrate on data that reaches them.")


def median_step(quantizers: list[Any], floor: float) -> float | None:
    """The median of the steps at or above ``floor`` of ``quantizers`` (None if there are none)."""
    steps = [q.scale.detach().float().reshape(-1).cpu() for q in quantizers]
    steps = [s[s >= floor] for s in steps]
    every = torch.cat(steps) if steps else torch.empty(0)
    return float(every.quantile(0.5)) if every.numel() else None


__all__ = ["fill_steps", "report", "collected", "message", "median_step"]
