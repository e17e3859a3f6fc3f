"""Kernel reshaping: constant kernels (R2, R9), re-dilation (R11), zero taps (R4), group expansion (R5).

All functions are plain tensor code and keep exact values: they only move
weights, multiply by 0 or 1, or insert zeros.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function


def identity_kernel(channels: int, groups: int, dtype: torch.dtype, device: Any = None) -> torch.Tensor:
    """R2: the 1x1 kernel of ``y = x`` for a conv with ``groups``: 1 at ``[o, o mod (C/groups)]``.

    >>> identity_kernel(4, 2, torch.float64)[:, :, 0, 0]
    tensor([[1., 0.],
            [0., 1.],
            [1., 0.],
            [0., 1.]], dtype=torch.float64)
    """
    per_group = channels // groups
    w = torch.zeros(channels, per_group, 1, 1, dtype=dtype, device=device)
    o = torch.arange(channels, device=device)
    w[o, o % per_group, 0, 0] = 1
    return w


def avgpool_kernel(channels: int, kernel: tuple[int, int], dtype: torch.dtype, device: Any = None) -> torch.Tensor:
    """R9: depthwise kernel of ``AvgPool2d(kernel, count_include_pad=True)``.

    >>> avgpool_kernel(2, (2, 2), torch.float64).flatten().tolist()
    [0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]
    """
    kh, kw = kernel
    return torch.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=dtype, device=device)


def redilate(weight: Any, factor: tuple[int, int]) -> Any:
    """R11: place tap ``t`` at ``factor*t`` with zeros between (same function at ``dilation/factor``).

    >>> redilate(torch.ones(1, 1, 1, 2), (1, 3))[0, 0]
    tensor([[1., 0., 0., 1.]])
    """
    fh, fw = factor
    if fh == 1 and fw == 1:
        return weight
    o, i, kh, kw = weight.shape
    w = weight.reshape(o, i, kh, 1, kw, 1)
    w = F.pad(w, (0, fw - 1, 0, 0, 0, fh - 1))  # pad the two unit axes
    w = w.reshape(o, i, kh * fh, kw * fw)
    return w[:, :, : fh * (kh - 1) + 1, : fw * (kw - 1) + 1]


def add_zero_taps(weight: Any, taps: tuple[tuple[int, int], tuple[int, int]]) -> Any:
    """R4: add zero taps ``((top, bottom), (left, right))`` around a kernel.

    >>> add_zero_taps(torch.ones(1, 1, 1, 1), ((1, 1), (0, 2))).shape
    torch.Size([1, 1, 3, 3])
    """
    (t, b), (l, r) = taps
    if t == b == l == r == 0:
        return weight
    return F.pad(weight, (l, r, t, b))


def expand_groups(weight: Any, groups: int, target_groups: int) -> Any:
    """R5: rewrite a kernel with ``groups`` as one with ``target_groups`` (which divides ``groups``).

    Output ``o`` keeps reading the same global input channels; the other columns are zero.

    >>> w = torch.ones(4, 1, 1, 1)                   # depthwise, 4 channels
    >>> expand_groups(w, 4, 1)[:, :, 0, 0]            # the dense identity pattern
    tensor([[1., 0., 0., 0.],
            [0., 1., 0., 0.],
            [0., 0., 1., 0.],
            [0., 0., 0., 1.]])
    """
    if groups == target_groups:
        return weight
    if groups % target_groups:
        raise AssertionError(f"target groups {target_groups} must divide groups {groups}")
    out_ch, in_per_group, kh, kw = weight.shape
    ratio = groups // target_groups  # source groups inside one target group
    source_group = torch.arange(out_ch) // (out_ch // groups)
    onehot = F.one_hot(source_group % ratio, ratio).to(dtype=weight.dtype, device=weight.device)
    expanded = weight.reshape(out_ch, 1, in_per_group, kh, kw) * onehot.reshape(out_ch, ratio, 1, 1, 1)
    return expanded.reshape(out_ch, ratio * in_per_group, kh, kw)


def embed_add(frame: Any, kernels: tuple, offsets: tuple, groups: tuple, frame_groups: int,
              inplace: bool = False) -> Any:
    """``frame + sum_k add_zero_taps(expand_groups(kernels[k], groups[k], frame_groups), taps_k)`` (R3 with R4, R5).

    ``offsets[k]`` is ``(top, left)``: the tap of ``frame`` where ``kernels[k]``'s tap (0, 0) goes.
    The kernels are added into a copy of ``frame`` where they land (:func:`embed_into`) instead of
    being padded and group-expanded to ``frame``'s size first: a 1x1 kernel touches the centre taps
    only, an identity or depthwise kernel the diagonal only. The values are those of the padded sum
    (the skipped terms are exact zeros). A tensor-like with ``__torch_function__`` sees it as one
    call (``passes.emit`` records it as one graph node). ``inplace`` is accepted for graphs saved by
    earlier versions, which called this function with it; the sum is always made in a copy here.

    >>> frame = torch.zeros(2, 2, 3, 3)
    >>> out = embed_add(frame, (torch.ones(2, 2, 1, 1), torch.full((2, 1, 1, 1), 5.0)), ((1, 1), (1, 1)), (1, 2), 1)
    >>> out[:, :, 1, 1]
    tensor([[6., 1.],
            [1., 6.]])
    """
    if has_torch_function((frame, *kernels)):
        return handle_torch_function(embed_add, (frame, *kernels), frame, kernels, offsets, groups, frame_groups)
    out = frame.clone()
    embed_into(out, kernels, offsets, groups, frame_groups)
    return out


def embed_into(out: torch.Tensor, kernels: tuple, offsets: tuple, groups: tuple, frame_groups: int) -> None:
    """Add each of ``kernels`` into ``out`` in place, where :func:`embed_add` puts it.

    >>> out = torch.zeros(1, 1, 3, 3)
    >>> embed_into(out, (torch.ones(1, 1, 1, 1),), ((2, 0),), (1,), 1)
    >>> out[0, 0, 2].tolist()
    [1.0, 0.0, 0.0]
    """
    for kernel, (top, left), g in zip(kernels, offsets, groups):
        region = out[:, :, top:top + kernel.shape[2], left:left + kernel.shape[3]]
        if g == frame_groups:
            region.add_(kernel)
        else:
            rows, columns, ratio = group_columns(kernel.shape[0], g, frame_groups, kernel.device)
            region.unflatten(1, (ratio, kernel.shape[1])).index_put_((rows, columns), kernel, accumulate=True)


def group_columns(out_channels: int, groups: int, frame_groups: int, device: Any = None) -> tuple:
    """``(rows, columns, ratio)``: output ``o`` of a kernel with ``groups`` reads its input columns at
    ``columns[o]`` of ``ratio`` column blocks of a ``frame_groups`` kernel.

    >>> rows, columns, ratio = group_columns(4, 4, 2)
    >>> columns.tolist(), ratio
    ([0, 1, 0, 1], 2)
    """
    if groups % frame_groups:
        raise AssertionError(f"frame groups {frame_groups} must divide groups {groups}")
    ratio = groups // frame_groups  # kernel groups inside one frame group
    rows = torch.arange(out_channels, device=device)
    return rows, (rows // (out_channels // groups)) % ratio, ratio


def per_input_channel(vector: Any, out_channels: int, groups: int) -> Any:
    """Lay a per-input-channel vector out as the ``[O, I/groups]`` matrix a grouped kernel sees.

    >>> per_input_channel(torch.tensor([1., 2., 3., 4.]), 2, 2)
    tensor([[1., 2.],
            [3., 4.]])
    """
    in_ch = vector.shape[0]
    per_group = in_ch // groups
    grouped = vector.reshape(groups, 1, per_group).expand(groups, out_channels // groups, per_group)
    return grouped.reshape(out_channels, per_group)
