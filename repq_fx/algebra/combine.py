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
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .affine import AffineConv, NoMatch, lattice_gcd
from .compose import _same
from .kernels import add_zero_taps, embed_add, expand_groups, redilate


def align(branches: Sequence[AffineConv]) -> list[AffineConv] | NoMatch:
    """The same maps on one frame (stride, padding, dilation, kernel size, groups), or why not."""
    plan = _plan(branches)
    if isinstance(plan, NoMatch):
        return plan
    out = []
    for b, (factors, taps) in zip(branches, plan.placements):
        w = redilate(b.weight, factors)
        w = add_zero_taps(w, taps)
        w = expand_groups(w, b.groups, plan.groups)
        out.append(AffineConv(w, b.bias, b.stride, plan.padding, plan.dilation, plan.groups, plan.pad_value))
    return out


@dataclass(frozen=True)
class _Plan:
    """The common frame of parallel branches and where each branch's kernel sits in it."""

    pad_value: Any | None
    groups: int
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    kernel_size: tuple[int, int]
    placements: list[tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]]  # (re-dilation, zero taps)


def _plan(branches: Sequence[AffineConv]) -> _Plan | NoMatch:
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
    placements = []
    for b in branches:
        factors, taps = [], []
        for dim, (lattice, lo, k, _) in enumerate(frames):
            kb, db = b.kernel_size[dim], b.dilation[dim]
            factors.append(db // lattice if kb > 1 else 1)
            before = (b.offset(dim) - lo) // lattice
            taps.append((before, k - before - factors[-1] * (kb - 1) - 1))
        placements.append((tuple(factors), tuple(taps)))
    padding = tuple((-lo, extent + lattice * (k - 1) + lo) for lattice, lo, k, extent in frames)
    dilation = tuple(f[0] for f in frames)
    kernel_size = tuple(f[2] for f in frames)
    return _Plan(pad_value, groups, padding, dilation, kernel_size, placements)  # type: ignore[arg-type]


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
        if not _same(v, values[0], "parallel branches pad their input with one value"):
            return NoMatch("branches pad their input with different values")
    return values[0]


def add(branches: Sequence[AffineConv], alphas: Sequence[float] | None = None) -> AffineConv | NoMatch:
    """R3: ``sum_b alpha_b * branch_b(x)`` as one map (``alpha`` +1 or -1; scales are ops of their own).

    The sum is built on the branch whose kernel already fills the common frame (the 3x3 of a
    RepVGG block): the other kernels are added into their taps and groups in place of a copy
    (``embed_add``), instead of each being zero-padded and group-expanded to the full frame.
    """
    plan = _plan(branches)
    if isinstance(plan, NoMatch):
        return plan
    alphas = list(alphas or [1.0] * len(branches))
    weights = [_scaled(b.weight, alpha) for b, alpha in zip(branches, alphas)]
    full = [i for i, (b, (factors, taps)) in enumerate(zip(branches, plan.placements))
            if b.groups == plan.groups and factors == (1, 1) and taps == ((0, 0), (0, 0))]
    base = full[0] if full else 0
    others = [i for i in range(len(branches)) if i != base]
    weight = weights[base]
    if base not in full:
        factors, taps = plan.placements[base]
        weight = expand_groups(add_zero_taps(redilate(weight, factors), taps), branches[base].groups, plan.groups)
    if others:
        kernels = tuple(redilate(weights[i], plan.placements[i][0]) for i in others)
        offsets = tuple((plan.placements[i][1][0][0], plan.placements[i][1][1][0]) for i in others)
        weight = embed_add(weight, kernels, offsets, tuple(branches[i].groups for i in others), plan.groups)
    bias = None
    for b, alpha in zip(branches, alphas):
        if b.bias is not None:
            bb = _scaled(b.bias, alpha)
            bias = bb if bias is None else bias + bb
    return AffineConv(weight, bias, branches[0].stride, plan.padding, plan.dilation, plan.groups, plan.pad_value)


def _scaled(t: Any, alpha: float) -> Any:
    return t if alpha == 1 else -t if alpha == -1 else t * alpha


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
