"""Each linear op as an :class:`AffineConv` (the leaves of every merge).

>>> m = conv(torch.ones(8, 4, 3, 3), None, stride=1, padding=1, dilation=1, groups=1)
>>> m.padding, m.kernel_size
(((1, 1), (1, 1)), (3, 3))
"""
from __future__ import annotations

from typing import Any

import torch

from .affine import AffineConv, NoMatch, pair, symmetric_pads
from .kernels import avgpool_kernel, identity_kernel


def conv(weight: Any, bias: Any | None, *, stride: Any, padding: Any, dilation: Any, groups: int) -> AffineConv:
    """A ``conv2d`` with zero padding."""
    return AffineConv(weight, bias, pair(stride), symmetric_pads(pair(padding)), pair(dilation), int(groups))


def diagonal(scale: Any, shift: Any | None) -> AffineConv:
    """``y[c] = scale[c] * x[c] + shift[c]`` as a depthwise 1x1 conv."""
    channels = int(scale.shape[0])
    return AffineConv(scale.reshape(channels, 1, 1, 1), shift, (1, 1), ((0, 0), (0, 0)), (1, 1), channels)


def identity(channels: int, dtype: torch.dtype, device: Any = None) -> AffineConv:
    """R2: ``y = x``."""
    return diagonal(torch.ones(channels, dtype=dtype, device=device), None)


def bn_scale_shift(mean: Any, var: Any, weight: Any | None, bias: Any | None, eps: float) -> tuple[Any, Any]:
    """R1: a BatchNorm with the given statistics as ``y = scale * x + shift``.

    ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale``; ``weight``/``bias``
    ``None`` means ``affine=False`` (gamma 1, beta 0). Elementwise, so stacked statistics of
    several BNs (``[B, C]``) fold at once. The one BN-fold formula of the package.

    >>> scale, shift = bn_scale_shift(torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.0]), None, 1.0)
    >>> scale.item(), shift.item()
    (1.0, -1.0)
    """
    inv_std = torch.rsqrt(var + eps)
    scale = inv_std if weight is None else weight * inv_std
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


def batch_norm(mean: Any, var: Any, weight: Any | None, bias: Any | None, eps: float) -> AffineConv:
    """R1: BatchNorm with the given statistics, ``gamma * (x - mean) / sqrt(var + eps) + beta``
    (see :func:`bn_scale_shift`), as a per-channel scale and shift."""
    return diagonal(*bn_scale_shift(mean, var, weight, bias, eps))


def avg_pool(
    channels: int,
    kernel: Any,
    stride: Any,
    padding: Any,
    *,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
    dtype: torch.dtype,
    device: Any = None,
) -> AffineConv | NoMatch:
    """R9: ``AvgPool2d`` as a depthwise conv (exact only with the PyTorch defaults)."""
    k, s, p = pair(kernel), pair(stride if stride else kernel), pair(padding)
    if ceil_mode:
        return NoMatch("avg-pool with ceil_mode=True: border windows differ from a conv")
    if divisor_override:
        return NoMatch("avg-pool with divisor_override: not a fixed kernel")
    if not count_include_pad and any(p):
        return NoMatch("avg-pool with count_include_pad=False and padding: border divisors differ from a conv")
    w = avgpool_kernel(channels, k, dtype, device)
    return AffineConv(w, None, s, symmetric_pads(p), (1, 1), channels)


def pad(channels: int, pads: Any, value: float, dtype: torch.dtype, device: Any = None) -> AffineConv | NoMatch:
    """``F.pad(x, (left, right, top, bottom), value=value)`` (negative pads crop)."""
    pads = [int(p) for p in pads]
    if len(pads) == 2:
        pads += [0, 0]
    if len(pads) != 4:
        return NoMatch(f"pad {pads}: only the two spatial dims can be padded inside a block")
    left, right, top, bottom = pads
    w = torch.ones(channels, 1, 1, 1, dtype=dtype, device=device)
    pad_value = None if value == 0 else torch.full((channels,), float(value), dtype=dtype, device=device)
    return AffineConv(w, None, (1, 1), ((top, bottom), (left, right)), (1, 1), channels, pad_value)


def identity_conv(channels: int, groups: int, dtype: torch.dtype, device: Any = None) -> AffineConv:
    """R2 for a grouped target: ``y = x`` with the kernel laid out for ``groups``."""
    return AffineConv(identity_kernel(channels, groups, dtype, device), None, (1, 1), ((0, 0), (0, 0)), (1, 1), groups)
