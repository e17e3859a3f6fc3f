"""Bring a merged map into the form of one ``nn.Conv2d``: symmetric, non-negative zero padding.

Zero taps are added at the kernel's edges: they read zeros or multiply by zero,
so the function is unchanged while the padding becomes symmetric (and crops
become padding). A non-zero pad value cannot be expressed by a conv and is refused.

>>> m = AffineConv(torch.ones(1, 1, 1, 2), None, (1, 1), ((0, 0), (0, 1)), (1, 1), 1)
>>> c = to_conv(m)
>>> c.weight.shape[-2:], c.padding
(torch.Size([1, 3]), (0, 1))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .affine import AffineConv, NoMatch, Pair
from .compose import _same
from .kernels import add_zero_taps, redilate


@dataclass(frozen=True)
class ConvParams:
    """Everything ``nn.Conv2d`` needs."""

    weight: Any  # [O, I // groups, kh, kw]
    bias: Any | None  # [O]
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])


def to_conv(m: AffineConv) -> ConvParams | NoMatch:
    """The ``nn.Conv2d`` parameters of ``m``, or why it is not one conv."""
    if m.reads_padding() and m.pad_value is not None and not _same(m.pad_value, None, "the merged map pads with zeros"):
        return NoMatch("the input is padded with a non-zero value: no single conv computes this at the borders")
    weight, dilation = m.weight, list(m.dilation)
    taps, padding = [], []
    for dim in range(2):
        p0, p1 = m.padding[dim]
        d = dilation[dim]
        if (p1 - p0) % d:
            weight = redilate(weight, (d, 1) if dim == 0 else (1, d))
            d = dilation[dim] = 1
        target = max(p0, p1, 0)
        target += (p0 - target) % d
        taps.append(((target - p0) // d, (target - p1) // d))
        padding.append(target)
    weight = add_zero_taps(weight, tuple(taps))
    return ConvParams(weight, m.bias, m.stride, tuple(padding), tuple(dilation), m.groups)


def to_module(p: ConvParams, dtype: torch.dtype | None = None) -> torch.nn.Conv2d:
    """A fresh ``nn.Conv2d`` holding ``p`` (weights cast to ``dtype``).

    >>> m = AffineConv(torch.ones(2, 2, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    >>> to_module(to_conv(m))
    Conv2d(2, 2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    """
    weight = p.weight.detach()
    dtype = dtype or weight.dtype
    conv = torch.nn.Conv2d(
        p.in_channels, p.out_channels, tuple(weight.shape[2:]), stride=p.stride, padding=p.padding,
        dilation=p.dilation, groups=p.groups, bias=True, device=weight.device, dtype=dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if p.bias is None:
            conv.bias.zero_()
        else:
            conv.bias.copy_(p.bias.detach())
    return conv
