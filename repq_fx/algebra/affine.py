"""The one value the algebra works on: an affine conv map, and the value of a non-match.

An :class:`AffineConv` is the function

    y[o, i, j] = b[o] + sum_{c,u,v} W[o, c, u, v] * x~[c, s_h*i + d_h*u - p_top, s_w*j + d_w*v - p_left]

where ``x~`` is ``x`` extended by ``pad_value`` (zeros when ``None``) outside the
image. Padding is per side and may be negative (a crop). Every re-parametrization
rule maps such functions to such functions; weights and biases may be plain
tensors (numeric merge) or symbolic values (``prepare`` emits them as FX nodes),
so the rules only use torch functions and arithmetic on them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

Pads = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
Pair = tuple[int, int]


@dataclass(frozen=True)
class NoMatch:
    """Why a rule does not apply; falsy, so ``if not result`` reads naturally.

    >>> r = NoMatch("3x3 -> 3x3 sequential with padding: not exact at borders")
    >>> bool(r), str(r)
    (False, '3x3 -> 3x3 sequential with padding: not exact at borders')
    """

    reason: str

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class AffineConv:
    """An affine conv map ``x -> conv(pad(x), weight) + bias`` (see module docstring).

    >>> m = AffineConv(torch.ones(4, 4, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    >>> m.in_channels, m.out_channels, m.kernel_size
    (4, 4, (3, 3))
    """

    weight: Any  # [O, I // groups, kh, kw]
    bias: Any | None  # [O]; None means zeros
    stride: Pair
    padding: Pads  # per side, negative means crop
    dilation: Pair
    groups: int
    pad_value: Any | None = None  # [I] value read outside the image; None means zeros

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def kernel_size(self) -> Pair:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    def reads_padding(self) -> bool:
        """True if some output may read a position outside the input image."""
        return any(p > 0 for side in self.padding for p in side)

    def extent(self, dim: int) -> int:
        """``p_before + p_after - d*(k-1)``: two maps with equal stride and extent give equal output sizes."""
        (p0, p1), d, k = self.padding[dim], self.dilation[dim], self.kernel_size[dim]
        return p0 + p1 - d * (k - 1)

    def offset(self, dim: int) -> int:
        """Input position read by tap 0 of output 0 (``-p_before``)."""
        return -self.padding[dim][0]

    def is_pointwise(self) -> bool:
        """1x1 kernel, stride 1, no padding: output pixel (i, j) depends on input pixel (i, j) only."""
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == ((0, 0), (0, 0))

    def is_pointwise_along(self, dim: int) -> bool:
        """Kernel 1, stride 1 and no padding or crop along ``dim``."""
        return self.kernel_size[dim] == 1 and self.stride[dim] == 1 and self.padding[dim] == (0, 0)

    def is_diagonal(self) -> bool:
        """Pointwise and channel-wise (a per-channel scale and shift)."""
        return self.is_pointwise() and self.groups == self.in_channels == self.out_channels

    def bias_or_zeros(self) -> Any:
        if self.bias is not None:
            return self.bias
        return torch.zeros(self.out_channels, dtype=self.weight.dtype, device=self.weight.device)

    def with_(self, **changes: Any) -> "AffineConv":
        return replace(self, **changes)


def pair(v: int | tuple[int, ...] | list[int]) -> Pair:
    """``3 -> (3, 3)``; ``(1, 2) -> (1, 2)``.

    >>> pair(3), pair([1, 2])
    ((3, 3), (1, 2))
    """
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise AssertionError(f"expected one or two ints, got {v!r}")
    return t  # type: ignore[return-value]


def symmetric_pads(p: Pair) -> Pads:
    """Conv-style padding ``(ph, pw)`` as per-side pads.

    >>> symmetric_pads((1, 2))
    ((1, 1), (2, 2))
    """
    return ((p[0], p[0]), (p[1], p[1]))


def lattice_gcd(*steps: int) -> int:
    """gcd of the non-zero steps (1 if there are none)."""
    g = 0
    for s in steps:
        g = math.gcd(g, s)
    return g or 1
