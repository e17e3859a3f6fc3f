"""Regression tests for prepare() bugs found while building later passes."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

import repq_fx
from repq_fx.examples.blocks import ACBlock, ECB


def test_identity_branch_after_a_rewritten_block_without_example_inputs():
    """An identity branch needs its block's entry width; without shape metadata it was read from the
    entry's users, which the rewrite of the block before (an ACB, no activation in between) had
    already moved (TypeError in ops.identity)."""
    torch.manual_seed(0)
    model = nn.Sequential(ACBlock(3, 8), ECB(8, 8, act_type="relu", with_idt=True)).double().eval()
    qmodel = repq_fx.prepare(model)
    repq_fx.disable_fake_quant(qmodel)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = model(x), qmodel.eval()(x)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-9


def test_learned_step_pushed_below_zero_is_clamped_positive():
    """SGD at lr 0.01 drove a first-layer LSQ weight step (about 3e-4) negative, which flips the grid
    and made lower() refuse the model; the quantizer now clamps it to float32 eps as torch.ao does."""
    from repq_fx.quant.fake_quant import WeightFakeQuant

    q = WeightFakeQuant(bits=8, channels=2, learned=True)
    w = torch.tensor([[0.5, -0.25], [0.1, 0.2]])
    q(w)
    with torch.no_grad():
        q.scale[0] = -0.001
    y = q(w)
    assert float(q.scale[0]) == torch.finfo(torch.float32).eps
    assert torch.isfinite(y).all() and bool((y[0] * w[0] >= 0).all())  # no sign flip


def test_bn_after_a_fixed_kernel_branch_in_train_mode():
    """AvgPool2d -> BN inside a block: RepQ-BN's branch statistics got the fixed avg-pool kernel
    as a tensor literal in the graph, which FX's generated code cannot spell (NameError:
    'float32'); found by the whole-network property test."""
    torch.manual_seed(0)

    class PoolBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn_conv = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.pool, self.bn_pool = nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn_conv(self.conv(x)) + self.bn_pool(self.pool(x))

    model = PoolBranch().double().train()
    qmodel = repq_fx.prepare(copy.deepcopy(model))
    repq_fx.disable_fake_quant(qmodel)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    expected, actual = model(x), qmodel.train()(x)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-9
