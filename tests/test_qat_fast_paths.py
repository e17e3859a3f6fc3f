"""The fast paths of the RepQ training step against the plain computations they replace.

- ``lsq_fake_quantize`` (vectorized LSQ on the CPU) against PyTorch's fused learnable fake-quant
  ops: forward bit for bit (ties included), input gradient bit for bit, step gradient to rounding.
- ``channel_moments`` against ``torch.var_mean`` (values and gradients).
- ``block_statistics`` (one wide conv per geometry, 1x1 and identity statistics from the input
  covariance, stacked estimates, BN folds stacked per width) against ``branch_statistics`` and
  ``bn_fold`` per BN: same statistics, folds, running-statistics updates and gradients, on
  mixed geometries (groups, channel multipliers, strides, biases, dilation, one-sided padding).
- ``embed_add`` against zero-padding and group-expanding each kernel and summing.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from repq_fx.algebra.kernels import add_zero_taps, embed_add, expand_groups
from repq_fx.quant import embed_add as runtime
from repq_fx.quant.bn_stats import IDENTITY, Branch, block_statistics, bn_fold, branch_statistics, channel_moments
from repq_fx.quant.lsq import lsq_fake_quantize


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- LSQ

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_per_channel_matches_fused_op(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    channels = 13
    x = torch.randn(channels, 5, 3, 3, generator=g) * 3
    scale = (x.abs().amax((1, 2, 3)) / (2 ** (bits - 1) - 1) * (0.5 + torch.rand(channels, generator=g))).float()
    # exact ties (k + 1/2 steps), both range ends and just beyond them
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x[:, 0, 0, 0] = (torch.randint(qmin, qmax, (channels,), generator=g).float() + 0.5) * scale
    x[:, 0, 0, 1] = (qmax + 0.5) * scale
    x[:, 0, 0, 2] = (qmin - 0.5) * scale
    x[:, 0, 1, 0] = qmax * scale
    x[:, 0, 1, 1] = qmin * scale
    zero = torch.zeros(channels)
    factor = 1 / math.sqrt(45 * qmax)
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours_s, ref_s = scale.clone().requires_grad_(), scale.clone().requires_grad_()
    ours = lsq_fake_quantize(ours_x, ours_s, zero, qmin, qmax, factor)
    ref = torch._fake_quantize_learnable_per_channel_affine(ref_x, ref_s, zero, 0, qmin, qmax, factor)
    assert torch.equal(ours, ref)
    dy = torch.randn(x.shape, generator=g)
    ours.backward(dy)
    ref.backward(dy)
    assert torch.equal(ours_x.grad, ref_x.grad)
    assert torch.allclose(ours_s.grad, ref_s.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("zero_point", [0.0, 37.0, 255.0])
def test_lsq_per_tensor_matches_fused_op(zero_point: float) -> None:
    g = torch.Generator().manual_seed(int(zero_point))
    x = torch.randn(4, 3, 6, 5, generator=g) * 3
    scale = torch.tensor([x.abs().max().item() / 100])
    zp = torch.tensor([zero_point])
    factor = 1 / math.sqrt(x.numel() * 255)
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours_s, ref_s = scale.clone().requires_grad_(), scale.clone().requires_grad_()
    ours = lsq_fake_quantize(ours_x, ours_s, zp, 0, 255, factor)
    ref = torch._fake_quantize_learnable_per_tensor_affine(ref_x, ref_s, zp, 0, 255, factor)
    assert torch.equal(ours, ref)
    dy = torch.randn(x.shape, generator=g)
    ours.backward(dy)
    ref.backward(dy)
    assert torch.equal(ours_x.grad, ref_x.grad)
    assert torch.allclose(ours_s.grad, ref_s.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- channel moments

def test_channel_moments_match_var_mean() -> None:
    x = (torch.randn(3, 5, 7, 6, dtype=torch.float64) + 2.0).requires_grad_()
    mean, var = channel_moments(x)
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    assert _rel(mean, ref_mean) <= 1e-12 and _rel(var, ref_var) <= 1e-12
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(mean @ a + var @ b, x)
    (ref_grad,) = torch.autograd.grad(ref_mean @ a + ref_var @ b, x)
    assert _rel(grad, ref_grad) <= 1e-12


# ----------------------------------------------------------------------------- block statistics

def _branches(channels: int, g: torch.Generator) -> list[Branch]:
    """Branches of one block input."""
    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    c = channels
    return [Branch(*b) for b in [
        (None, None, (1, 1), ((0, 0), (0, 0)), (1, 1), 1, None),                  # identity
        (w(c, c, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1, None),        # two 3x3 of one geometry
        (w(c, c, 3, 3), w(c), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, None),
        (w(c, c, 1, 1), None, (1, 1), ((0, 0), (0, 0)), (1, 1), 1, None),        # dense 1x1: covariance
        (w(c, c, 1, 1), w(c), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, None),
        (w(2 * c, 1, 1, 1), None, (1, 1), ((0, 0), (0, 0)), (1, 1), c, None),   # depthwise 1x1, multiplier 2
        (w(c, c // 2, 1, 1), None, (1, 1), ((0, 0), (0, 0)), (1, 1), 2, None),  # grouped 1x1
        (w(c, 1, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), c, None),        # depthwise 3x3, stacked
        (w(c, 1, 3, 3), w(c), (1, 1), ((1, 1), (1, 1)), (1, 1), c, None),
        (w(c, c // 2, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 2, None),  # grouped 3x3, stacked
        (w(c, c // 2, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 2, None),
        (w(c, c, 1, 1), None, (2, 2), ((0, 0), (0, 0)), (1, 1), 1, None),        # strided 1x1
        (w(c, c, 3, 1), None, (1, 1), ((1, 1), (0, 0)), (1, 1), 1, None),        # ACB 3x1
        (w(c, 1, 3, 3), None, (1, 1), ((2, 2), (2, 2)), (2, 2), c, None),        # dilated
        (w(c, c, 3, 3), None, (1, 1), ((1, 0), (0, 1)), (1, 1), 1, None),        # one-sided padding
    ]]


@pytest.mark.parametrize("mode", ["batch", "estimate"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_block_statistics_equal_branch_statistics(mode: str, momentum: float | None) -> None:
    g = torch.Generator().manual_seed(3)
    channels = 6
    x = (torch.randn(4, channels, 9, 8, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    branches = _branches(channels, g)
    bns = []
    for weight, *_ in branches:
        out = channels if weight is None else weight.shape[0]
        bn = nn.BatchNorm2d(out, momentum=momentum).double().train()
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        bns.append(bn)
    ref_bns = copy.deepcopy(bns)
    shared = block_statistics(x, branches, bns, mode)
    got = [branch_statistics(x, b, bn, mode, s) for b, bn, s in zip(branches, bns, shared)]
    ref = [branch_statistics(x, b, bn, mode) for b, bn in zip(branches, ref_bns)]
    for stats, (ref_mean, ref_var) in zip(got, ref):
        assert _rel(stats[0], ref_mean) <= 1e-10 and _rel(stats[1], ref_var) <= 1e-10
    # the BN folds computed together (stacked per width) equal bn_fold of each BN on its own
    folds = [bn_fold(stats, bn.weight, bn.bias, bn.eps) for stats, bn in zip(got, bns)]
    ref_folds = [bn_fold(stats, bn.weight, bn.bias, bn.eps) for stats, bn in zip(ref, ref_bns)]
    assert sum(s.scale is not None for s in shared) >= 4
    for (scale, shift), (ref_scale, ref_shift) in zip(folds, ref_folds):
        assert _rel(scale, ref_scale) <= 1e-10 and _rel(shift, ref_shift) <= 1e-10
    for bn, ref_bn in zip(bns, ref_bns):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.allclose(getattr(bn, name).double(), getattr(ref_bn, name).double(), rtol=1e-10, atol=0)
    coeffs = [torch.randn(m.shape[0], generator=g, dtype=torch.float64) for m, _ in ref]
    inputs = [x] + [t for b in branches for t in (b.weight, b.bias) if t is not None]
    bn_params = [p for bn in bns for p in (bn.weight, bn.bias)]
    ref_bn_params = [p for bn in ref_bns for p in (bn.weight, bn.bias)]
    loss = sum((s[0] * c).sum() + (s[1] * c.flip(0)).sum() + (f[0] * c).sum() + (f[1] * c).sum()
               for s, f, c in zip(got, folds, coeffs))
    ref_loss = sum((s[0] * c).sum() + (s[1] * c.flip(0)).sum() + (f[0] * c).sum() + (f[1] * c).sum()
                   for s, f, c in zip(ref, ref_folds, coeffs))
    grads = torch.autograd.grad(loss, inputs + bn_params)
    ref_grads = torch.autograd.grad(ref_loss, inputs + ref_bn_params)
    for a, b in zip(grads, ref_grads):
        assert _rel(a, b) <= 1e-10


def test_block_statistics_eval_and_running_modes_use_running_statistics() -> None:
    x = torch.randn(2, 4, 5, 5)
    branches = [Branch(torch.randn(4, 4, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1), IDENTITY]
    bns = [nn.BatchNorm2d(4).eval(), nn.BatchNorm2d(4).train()]
    assert block_statistics(x, branches, bns, "running") == (None, None)
    stats = block_statistics(x, branches, bns, "batch")
    assert stats[0] is None and stats[1] is not None
    assert int(bns[0].num_batches_tracked) == 0 and int(bns[1].num_batches_tracked) == 1


# ----------------------------------------------------------------------------- embed_add

@pytest.mark.parametrize("add", [embed_add, runtime.embed_add], ids=["algebra", "training-kernel"])
@pytest.mark.parametrize("frame_groups", [1, 2])
def test_embed_add_equals_padded_sum(frame_groups: int, add) -> None:
    g = torch.Generator().manual_seed(5)
    out, channels = 8, 8
    frame = torch.randn(out, channels // frame_groups, 5, 3, generator=g, dtype=torch.float64)
    kernels = (torch.randn(out, channels // frame_groups, 1, 1, generator=g, dtype=torch.float64),
               torch.randn(out, 1, 3, 3, generator=g, dtype=torch.float64),     # depthwise
               torch.randn(out, channels // 4, 5, 1, generator=g, dtype=torch.float64))  # 4 groups
    groups = (frame_groups, channels, 4)
    offsets = ((2, 1), (1, 0), (0, 2))
    params = [frame.clone().requires_grad_()] + [k.clone().requires_grad_() for k in kernels]
    got = add(params[0], tuple(params[1:]), offsets, groups, frame_groups)
    ref = params[0]
    for k, (top, left), grp in zip(params[1:], offsets, groups):
        taps = ((top, 5 - top - k.shape[2]), (left, 3 - left - k.shape[3]))
        ref = ref + expand_groups(add_zero_taps(k, taps), grp, frame_groups)
    assert _rel(got, ref) <= 1e-15
    dy = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(got, params, dy)
    ref_grads = torch.autograd.grad(ref, params, dy)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("groups, per_group, kernel", [(1, 6, (3, 3)), (1, 6, (1, 1)), (6, 1, (3, 3)), (2, 3, (3, 1))])
def test_estimate_moments_match_formula(groups: int, per_group: int, kernel: tuple[int, int]) -> None:
    """The estimate (``_TapMoments``) against the formula written out with autograd:
    ``mean_o = sum W[o,i,u,v] E[x_i]``, ``var_o = sum W[o,i,u,v]^2 Var[x_i]``; values and gradients."""
    from repq_fx.algebra.kernels import per_input_channel
    from repq_fx.quant.estimate_stats import _estimate_moments

    g = torch.Generator().manual_seed(11)
    n, out = 3, 12
    weights = torch.randn(n, out, per_group, *kernel, generator=g, dtype=torch.float64).requires_grad_()
    mean_x = torch.randn(groups * per_group, generator=g, dtype=torch.float64).requires_grad_()
    var_x = torch.rand(groups * per_group, generator=g, dtype=torch.float64).add(0.1).requires_grad_()
    mean, var = _estimate_moments(list(weights.unbind(0)), mean_x, var_x, groups)
    m_l, v_l = per_input_channel(mean_x, out, groups), per_input_channel(var_x, out, groups)
    ref_mean = (weights.sum(dim=(3, 4)) * m_l).sum(dim=2)
    ref_var = (weights.square().sum(dim=(3, 4)) * v_l).sum(dim=2)
    assert _rel(mean, ref_mean) <= 1e-12 and _rel(var, ref_var) <= 1e-12
    a, b = torch.randn(n, out, generator=g, dtype=torch.float64), torch.randn(n, out, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((mean * a).sum() + (var * b).sum(), (weights, mean_x, var_x))
    ref_grads = torch.autograd.grad((ref_mean * a).sum() + (ref_var * b).sum(), (weights, mean_x, var_x))
    for got, ref in zip(grads, ref_grads):
        assert _rel(got, ref) <= 1e-12
