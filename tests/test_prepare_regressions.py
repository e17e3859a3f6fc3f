"""Regression tests for prepare() bugs found while building later passes."""
from __future__ import annotations

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
