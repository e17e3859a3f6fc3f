"""Run an :class:`AffineConv` map on a tensor, straight from its definition (the tests' reference).

>>> m = AffineConv(torch.ones(1, 1, 1, 1), torch.tensor([1.0]), (1, 1), ((1, 0), (0, 0)), (1, 1), 1)
>>> apply(m, torch.zeros(1, 1, 1, 1)).flatten().tolist()
[1.0, 1.0]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .affine import AffineConv


def apply(m: AffineConv, x: torch.Tensor) -> torch.Tensor:
    """``conv(pad(x, pad_value), weight) + bias`` with per-side padding and crops."""
    (top, bottom), (left, right) = m.padding
    if m.pad_value is None and top == bottom >= 0 and left == right >= 0:  # conv2d pads by itself
        return F.conv2d(x, m.weight, m.bias, m.stride, (top, left), m.dilation, m.groups)
    if m.pad_value is None:
        x = F.pad(x, (left, right, top, bottom))
    else:
        shift = m.pad_value.reshape(1, -1, 1, 1)
        x = F.pad(x - shift, (left, right, top, bottom)) + shift
    return F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
