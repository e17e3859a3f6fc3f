"""Parallel branches that read the same tensor: weighted sums (R3) and depth concat (R8).

Branches are first brought onto one frame (R4 alignment, R11 re-dilation, R5 group
expansion): the same stride, the same output size for every input size
(``p_before + p_after - d*(k-1)`` equal) and taps on one common lattice.

>>> a = AffineConv(torch.randn(4, 4, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
>>> b = AffineConv(torch.randn(4, 4, 1, 1), None, (1, 1), ((0, 0), (0, 0)), (1, 1), 1)
>>> add([a, b]).kernel_size
(3, 3)
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .affine import AffineConv, NoMatch, lattice_gcd
from .compose import _same
from .kernels import add_zero_taps, expand_groups, redilate


def align(branches: Sequence[AffineConv]) -> list[AffineConv] | NoMatch:
    """The same maps on one frame (stride, padding, dilation, kernel size, groups), or why not."""
    first = branches[0]
    for b in branches[1:]:
        if b.stride != first.stride:
            return NoMatch(f"branches with different strides {first.stride} and {b.stride}")
        if b.in_channels != first.in_channels:
            return NoMatch("branches read different channel counts")
    pad_value = _common_pad_value(branches)
    if isinstance(pad_value, NoMatch):
        return pad_value
    groups = 0
    for b in branches:
        groups = math.gcd(groups, b.groups)
    frames = []
    for dim in range(2):
        frame = _frame(branches, dim)
        if isinstance(frame, NoMatch):
            return frame
        frames.append(frame)
    out = []
    for b in branches:
        factors, taps = [], []
        for dim, (lattice, lo, k, _) in enumerate(frames):
            kb, db = b.kernel_size[dim], b.dilation[dim]
            factors.append(db // lattice if kb > 1 else 1)
            before = (b.offset(dim) - lo) // lattice
            taps.append((before, k - before - factors[-1] * (kb - 1) - 1))
        w = redilate(b.weight, tuple(factors))
        w = add_zero_taps(w, tuple(taps))
        w = expand_groups(w, b.groups, groups)
        padding = tuple((-lo, extent + lattice * (k - 1) + lo) for lattice, lo, k, extent in frames)
        dilation = tuple(f[0] for f in frames)
        out.append(AffineConv(w, b.bias, b.stride, padding, dilation, groups, pad_value))
    return out


def _frame(branches: Sequence[AffineConv], dim: int) -> tuple[int, int, int, int] | NoMatch:
    """(lattice, lowest offset, kernel size, extent) shared by all branches along ``dim``."""
    extents = {b.extent(dim) for b in branches}
    if len(extents) > 1:
        return NoMatch(
            "branch grids do not align: kernel/padding combinations give different output sizes "
            f"({_describe(branches, dim)})"
        )
    offsets = [b.offset(dim) for b in branches]
    lo = min(offsets)
    ends = [b.offset(dim) + b.dilation[dim] * (b.kernel_size[dim] - 1) for b in branches]
    steps = [b.dilation[dim] for b in branches if b.kernel_size[dim] > 1]
    steps += [o - lo for o in offsets]
    lattice = lattice_gcd(*steps)
    k = (max(ends) - lo) // lattice + 1
    return lattice, lo, k, extents.pop()


def _describe(branches: Sequence[AffineConv], dim: int) -> str:
    return ", ".join(
        f"k={b.kernel_size[dim]} p={b.padding[dim]} d={b.dilation[dim]}" for b in branches
    )


def _common_pad_value(branches: Sequence[AffineConv]) -> Any | None | NoMatch:
    values = [b.pad_value for b in branches if b.reads_padding()]
    if not values:
        return None
    for v in values[1:]:
        if not _same(v, values[0]):
            return NoMatch("branches pad their input with different values")
    return values[0]


def add(branches: Sequence[AffineConv], alphas: Sequence[float] | None = None) -> AffineConv | NoMatch:
    """R3: ``sum_b alpha_b * branch_b(x)`` as one map (``alpha`` +1 or -1; scales are ops of their own)."""
    aligned = align(branches)
    if isinstance(aligned, NoMatch):
        return aligned
    alphas = alphas or [1.0] * len(aligned)
    weight, bias = None, None
    for alpha, b in zip(alphas, aligned):
        w = b.weight if alpha == 1 else -b.weight if alpha == -1 else b.weight * alpha
        weight = w if weight is None else weight + w
        if b.bias is not None:
            bb = b.bias if alpha == 1 else -b.bias if alpha == -1 else b.bias * alpha
            bias = bb if bias is None else bias + bb
    return aligned[0].with_(weight=weight, bias=bias)


def concat(branches: Sequence[AffineConv]) -> AffineConv | NoMatch:
    """R8: ``cat([branch_b(x)], dim=1)`` as one map (a dense conv when the branches are grouped)."""
    aligned = align(branches)
    if isinstance(aligned, NoMatch):
        return aligned
    if aligned[0].groups != 1:
        aligned = [b.with_(weight=expand_groups(b.weight, b.groups, 1), groups=1) for b in aligned]
    weight = torch.cat([b.weight for b in aligned], dim=0)
    bias = None
    if any(b.bias is not None for b in aligned):
        bias = torch.cat([b.bias_or_zeros() for b in aligned], dim=0)
    return aligned[0].with_(weight=weight, bias=bias)
