"""Sequential composition ``second(first(x))`` of two affine conv maps (R1, R6, R7, R10, R13).

The composite reads input position ``s1*(s2*i + d2*t - p2) + d1*r - p1`` for taps
``t`` of the second and ``r`` of the first map, so it is a conv with stride
``s1*s2``, padding ``s1*p2 + p1`` and taps on the lattice ``gcd(s1*d2, d1)``.

Exactness: if the second map reads its padding, the value it reads there must be
what the first map would output on padding. That holds only for a pointwise first
map (1x1, stride 1) whose response to the composite's pad value equals the second
map's pad value: zero padding after a bias-free 1x1, or the bias-valued padding of
DBB and ECB. Everything else (e.g. 3x3 -> 3x3 with padding) is refused.

>>> a = AffineConv(torch.randn(4, 3, 1, 1), None, (1, 1), ((0, 0), (0, 0)), (1, 1), 1)
>>> b = AffineConv(torch.randn(5, 4, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
>>> compose(b, a).kernel_size
(3, 3)
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .affine import AffineConv, NoMatch, lattice_gcd
from .decisions import concrete, decide
from .kernels import expand_groups, per_input_channel, redilate

#: pad values closer than this (relative) are the same value; both sides come from the same parameters
PAD_VALUE_RTOL = 1e-5


def compose(second: AffineConv, first: AffineConv) -> AffineConv | NoMatch:
    """The map ``x -> second(first(x))``, or why it is not one conv."""
    if first.out_channels != second.in_channels:
        raise AssertionError(f"channel mismatch: {first.out_channels} -> {second.in_channels}")
    pad_value = _composite_pad_value(second, first)
    if isinstance(pad_value, NoMatch):
        return pad_value
    if second.is_diagonal():
        return _scale_outputs(first, second, pad_value)
    if first.is_diagonal():
        return _scale_inputs(second, first, pad_value)
    return _general(second, first, pad_value)


def _composite_pad_value(second: AffineConv, first: AffineConv) -> Any | None | NoMatch:
    padded_dims = [d for d in range(2) if any(p > 0 for p in second.padding[d])]
    if not padded_dims:
        return first.pad_value if first.reads_padding() else None
    if not all(first.is_pointwise_along(d) for d in padded_dims):
        k1, k2 = first.kernel_size, second.kernel_size
        return NoMatch(
            f"{k1[0]}x{k1[1]} -> {k2[0]}x{k2[1]} sequential with padding on the intermediate: "
            "not exact at borders (the first conv's response in the pad region is not constant)"
        )
    # Outside the image along a padded dim, first(x~) is W1 @ pi + b1: it must equal second's pad value.
    target = second.pad_value
    response = first.bias
    solved: Any | None | NoMatch
    if _same(target, response, "the pad value is the response of the map before it to a zero pixel"):
        solved = None
    elif first.kernel_size == (1, 1) and first.groups == first.in_channels == first.out_channels and decide(
            "nonzero", "the pad value can be moved before the per-channel scale (no scale is 0)",
            bool((concrete(first.weight) != 0).all()), first.weight):
        diff = _zeros_like_out(first) if target is None else target
        if response is not None:
            diff = diff - response
        solved = diff / first.weight.reshape(-1)
    else:
        k = second.kernel_size
        return NoMatch(
            f"1x1 -> {k[0]}x{k[1]} sequential: the intermediate is padded with a value other than the 1x1's "
            "response to a zero pixel (a nonzero bias before a zero-padded conv); not exact at borders"
        )
    if first.reads_padding() and not _same(first.pad_value, solved, "the two maps of a sequence pad with one value"):
        return NoMatch("the two convs of a sequence pad with different values: not exact at borders")
    return solved


def _same(a: Any | None, b: Any | None, question: str) -> bool:
    """Numeric equality of two per-channel vectors (``None`` is zeros).

    Two ``None`` are equal whatever the values; otherwise the answer comes from the current
    values and is recorded (``decisions``) under ``question``.
    """
    va, vb = concrete(a), concrete(b)
    if va is None and vb is None:
        return True
    if va is None:
        va = torch.zeros_like(vb)
    if vb is None:
        vb = torch.zeros_like(va)
    scale = max(float(va.abs().max()), float(vb.abs().max()), 1.0) if va.numel() else 1.0
    return decide("equal", question, bool(((va.double() - vb.double()).abs() <= PAD_VALUE_RTOL * scale).all()), va, vb)


def _zeros_like_out(m: AffineConv) -> torch.Tensor:
    return torch.zeros(m.out_channels, dtype=m.weight.dtype, device=m.weight.device)


def _scale_outputs(first: AffineConv, diag: AffineConv, pad_value: Any | None) -> AffineConv:
    """R1/R10: a per-channel scale and shift after ``first``."""
    weight = first.weight * diag.weight  # [O, I/g, kh, kw] * [O, 1, 1, 1]
    bias = diag.bias
    if first.bias is not None:
        scale = diag.weight.reshape(-1)
        bias = first.bias * scale if bias is None else first.bias * scale + bias
    return first.with_(weight=weight, bias=bias, pad_value=pad_value)


def _scale_inputs(second: AffineConv, diag: AffineConv, pad_value: Any | None) -> AffineConv:
    """R13: a per-channel scale and shift before ``second``."""
    scale = per_input_channel(diag.weight.reshape(-1), second.out_channels, second.groups)
    weight = second.weight * scale.reshape(*scale.shape, 1, 1)
    bias = second.bias
    if diag.bias is not None:
        bias = _bias_through(second, diag.bias) if bias is None else bias + _bias_through(second, diag.bias)
    return second.with_(weight=weight, bias=bias, pad_value=pad_value)


def _bias_through(second: AffineConv, first_bias: Any) -> Any:
    """``sum_{c,u,v} W2[o, c, u, v] * b1[c]``: a constant input seen through every tap."""
    b = per_input_channel(first_bias, second.out_channels, second.groups)
    return (second.weight.sum(dim=(2, 3)) * b).sum(dim=1)


def composite_shape(second: AffineConv, first: AffineConv) -> tuple[int, int, int, int]:
    """Weight shape of ``compose(second, first)`` without computing it (for cost checks)."""
    if second.is_diagonal():
        return tuple(first.weight.shape)  # type: ignore[return-value]
    if first.is_diagonal():
        return tuple(second.weight.shape)  # type: ignore[return-value]
    groups = math.gcd(first.groups, second.groups)
    kernel = [_composite_dim(second, first, dim)[0] for dim in range(2)]
    return second.out_channels, first.in_channels // groups, kernel[0], kernel[1]


def _composite_dim(second: AffineConv, first: AffineConv, dim: int) -> tuple[int, int, int, int, tuple[int, int]]:
    """(kernel size, lattice, factor1, factor2, padding) of the composite along ``dim``."""
    s1 = first.stride[dim]
    d1, d2 = first.dilation[dim], second.dilation[dim]
    k1, k2 = first.kernel_size[dim], second.kernel_size[dim]
    step1 = d1 if k1 > 1 else 0
    step2 = s1 * d2 if k2 > 1 else 0
    lattice = lattice_gcd(step1, step2)
    f1 = step1 // lattice if step1 else 1
    f2 = step2 // lattice if step2 else 1
    k = f1 * (k1 - 1) + f2 * (k2 - 1) + 1
    p0 = s1 * second.padding[dim][0] + first.padding[dim][0]
    extent = first.extent(dim) + s1 * second.extent(dim)
    return k, lattice, f1, f2, (p0, extent + lattice * (k - 1) - p0)


def _general(second: AffineConv, first: AffineConv, pad_value: Any | None) -> AffineConv:
    """R6/R7 and kxk -> kxk without intermediate padding: the full convolution of the two kernels."""
    groups = math.gcd(first.groups, second.groups)
    w1 = expand_groups(first.weight, first.groups, groups)
    w2 = expand_groups(second.weight, second.groups, groups)
    dims = [_composite_dim(second, first, dim) for dim in range(2)]
    stride = tuple(first.stride[d] * second.stride[d] for d in range(2))
    dilation = tuple(dim[1] for dim in dims)
    padding = tuple(dim[4] for dim in dims)
    w1 = redilate(w1, (dims[0][2], dims[1][2]))
    w2 = redilate(w2, (dims[0][3], dims[1][3]))
    kh2, kw2 = w2.shape[2], w2.shape[3]
    # weight[e, c] = sum_d full_conv(w2[e, d], w1[d, c]) per group, as one grouped conv2d
    weight = F.conv2d(w1.permute(1, 0, 2, 3), w2.flip(dims=(2, 3)), padding=(kh2 - 1, kw2 - 1), groups=groups)
    weight = weight.permute(1, 0, 2, 3)
    bias = second.bias
    if first.bias is not None:
        through = _bias_through(second, first.bias)
        bias = through if bias is None else bias + through
    return AffineConv(weight, bias, stride, padding, dilation, groups, pad_value)
