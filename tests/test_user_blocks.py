"""User-written re-parametrized blocks (``repq_fx.testing.blocks``) against the merge contract.

- Test A (self-consistency): each block's own ``reference_merge()`` used in ``F.conv2d``
  equals the block's eval-mode forward (before and after its activation).
- Test B (contract): ``repq_fx.merge(block)`` is a graph with exactly one conv whose
  eval output equals ``block.eval()`` and the input block is left untouched.

Everything runs in float64 with BN running statistics calibrated by a few train-mode
forwards (``momentum=None``, a cumulative average), and random perturbations of every
parameter so that zero-initialised weights (DBB's identity-based 1x1, OREPA's prior
scale) take part. Errors are relative: ``max|a - b| / max|b|``.
"""
from __future__ import annotations

import copy
import doctest
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repq_fx
from repq_fx.testing import blocks as B

REL_TOL = 1e-9
SPATIAL = (11, 13)  # odd and non-square, so row/column mix-ups show


def _case(make: Callable[[], nn.Module], in_channels: int, id: str):
    return pytest.param(make, in_channels, id=id)


BLOCK_CASES = [
    # RepVGG: identity BN only when in == out and stride 1.
    _case(lambda: B.RepVGGBlock(8, 8, 3, stride=1), 8, "repvgg-k3-s1"),
    _case(lambda: B.RepVGGBlock(8, 16, 3, stride=2), 8, "repvgg-k3-s2"),
    _case(lambda: B.RepVGGBlock(8, 16, 3, stride=1), 8, "repvgg-k3-s1-noid"),
    _case(lambda: B.RepVGGBlock(8, 8, 3, stride=1, groups=2), 8, "repvgg-k3-g2"),
    _case(lambda: B.RepVGGBlock(8, 16, 3, stride=2, groups=4), 8, "repvgg-k3-s2-g4"),
    _case(lambda: B.RepVGGBlock(8, 8, 3, stride=1, groups=8), 8, "repvgg-k3-dw"),
    _case(lambda: B.RepVGGBlock(8, 8, 5, stride=1), 8, "repvgg-k5-s1"),
    _case(lambda: B.RepVGGBlock(8, 16, 5, stride=2, groups=2), 8, "repvgg-k5-s2-g2"),
    # QARepVGG (post BN; plain 1x1 and identity).
    _case(lambda: B.QARepVGGBlock(8, 8, 3, stride=1), 8, "qarep-k3-s1"),
    _case(lambda: B.QARepVGGBlock(8, 16, 3, stride=2), 8, "qarep-k3-s2"),
    _case(lambda: B.QARepVGGBlock(8, 8, 3, stride=2), 8, "qarep-k3-s2-sameC"),
    _case(lambda: B.QARepVGGBlock(8, 8, 3, stride=1, groups=2), 8, "qarep-k3-g2"),
    _case(lambda: B.QARepVGGBlock(8, 8, 5, stride=1, groups=4), 8, "qarep-k5-g4"),
    # QARepVGG V2 (+ avg pool branch).
    _case(lambda: B.QARepVGGBlockV2(8, 8, 3, stride=1), 8, "qarep2-k3-s1"),
    _case(lambda: B.QARepVGGBlockV2(8, 16, 3, stride=2), 8, "qarep2-k3-s2"),
    _case(lambda: B.QARepVGGBlockV2(8, 8, 3, stride=1, groups=2), 8, "qarep2-k3-g2"),
    _case(lambda: B.QARepVGGBlockV2(8, 8, 5, stride=1), 8, "qarep2-k5-s1"),
    # ACNet: 'same' padding, larger padding, and the crop path (padding < k // 2).
    _case(lambda: B.ACBlock(8, 8, 3, stride=1), 8, "acb-k3-s1"),
    _case(lambda: B.ACBlock(8, 16, 3, stride=2), 8, "acb-k3-s2"),
    _case(lambda: B.ACBlock(8, 8, 5, stride=1, groups=2), 8, "acb-k5-g2"),
    _case(lambda: B.ACBlock(8, 8, 3, stride=1, padding=2), 8, "acb-k3-p2"),
    _case(lambda: B.ACBlock(8, 8, 3, stride=1, padding=0), 8, "acb-k3-crop1"),
    _case(lambda: B.ACBlock(8, 8, 5, stride=1, padding=0), 8, "acb-k5-crop2"),
    _case(lambda: B.ACBlock(8, 16, 5, stride=2, padding=1, groups=2), 8, "acb-k5-s2-g2-crop1"),
    # DBB: dense, strided, grouped, depthwise, plain 1x1 first conv.
    _case(lambda: B.DiverseBranchBlock(8, 16, 3, stride=1), 8, "dbb-k3-s1"),
    _case(lambda: B.DiverseBranchBlock(8, 8, 3, stride=2), 8, "dbb-k3-s2"),
    _case(lambda: B.DiverseBranchBlock(8, 8, 5, stride=1, groups=4), 8, "dbb-k5-g4"),
    _case(lambda: B.DiverseBranchBlock(8, 16, 5, stride=2, groups=2), 8, "dbb-k5-s2-g2"),
    _case(lambda: B.DiverseBranchBlock(8, 8, 3, stride=1, groups=8), 8, "dbb-k3-dw"),
    _case(lambda: B.DiverseBranchBlock(8, 8, 3, stride=2, groups=8), 8, "dbb-k3-s2-dw"),
    _case(lambda: B.DiverseBranchBlock(8, 16, 3, stride=1, internal_channels_1x1_3x3=16), 8,
          "dbb-k3-plain1x1"),
    _case(lambda: B.DiverseBranchBlock(8, 16, 3, stride=1, nonlinear=nn.ReLU()), 8, "dbb-k3-relu"),
    # OREPA-style parallel branches with per-channel vectors and a post BN.
    _case(lambda: B.OREPABlock(8, 16, 3, stride=1), 8, "orepa-k3-s1"),
    _case(lambda: B.OREPABlock(8, 8, 3, stride=2), 8, "orepa-k3-s2"),
    _case(lambda: B.OREPABlock(8, 8, 3, stride=1, groups=4), 8, "orepa-k3-g4"),
    _case(lambda: B.OREPABlock(8, 16, 5, stride=2, groups=2), 8, "orepa-k5-s2-g2"),
    _case(lambda: B.OREPABlock(8, 8, 3, stride=1, groups=8, expand_ratio=2), 8, "orepa-k3-dw"),
    # ECB (no BN; bias-valued padding).
    _case(lambda: B.ECB(8, 8, depth_multiplier=2.0, act_type="prelu", with_idt=True), 8, "ecb-prelu-idt"),
    _case(lambda: B.ECB(4, 8, depth_multiplier=2.0, act_type="relu"), 4, "ecb-relu-4to8"),
    _case(lambda: B.ECB(8, 8, depth_multiplier=0.5, act_type="linear"), 8, "ecb-linear"),
    # RepLKNet large kernels.
    _case(lambda: B.ReparamLargeKernelConv(8, 8, 13, stride=1, small_kernel=5), 8, "replk-k13-s1"),
    _case(lambda: B.ReparamLargeKernelConv(8, 8, 13, stride=2, small_kernel=5), 8, "replk-k13-s2"),
    _case(lambda: B.ReparamLargeKernelConv(8, 16, 7, stride=2, groups=2, small_kernel=3), 8,
          "replk-k7-s2-g2"),
    _case(lambda: B.ReparamLargeKernelConv(8, 8, 5, stride=1, small_kernel=None), 8, "replk-k5-nosmall"),
    # UniRepLKNet dilated branches.
    _case(lambda: B.DilatedReparamBlock(8, kernel_size=5), 8, "dilated-k5"),
    _case(lambda: B.DilatedReparamBlock(8, kernel_size=7), 8, "dilated-k7"),
    _case(lambda: B.DilatedReparamBlock(8, kernel_size=13), 8, "dilated-k13"),
]

NET_BLOCKS = [
    pytest.param(B.RepVGGBlock, id="repvgg"),
    pytest.param(B.QARepVGGBlock, id="qarep"),
    pytest.param(B.QARepVGGBlockV2, id="qarep2"),
]


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------

def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _input(in_channels: int, batch: int = 2, spatial: tuple[int, int] = SPATIAL, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_channels, *spatial, generator=g, dtype=torch.float64) + 0.5


def _calibrated(module: nn.Module, in_channels: int, spatial: tuple[int, int] = SPATIAL,
                seed: int = 0) -> nn.Module:
    """float64, every parameter perturbed, BN running stats from 3 train-mode forwards, eval mode."""
    torch.manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        module.train()
        for step in range(3):
            module(_input(in_channels, batch=4, spatial=spatial, seed=100 + step))
    return module.eval()


def _without_activation(block: B.ReparamBlock) -> B.ReparamBlock:
    block = copy.deepcopy(block)
    if block.activation_name is not None:
        setattr(block, block.activation_name, nn.Identity())
    return block


def _conv_count(gm: fx.GraphModule) -> int:
    """Convs in a graph: ``call_module`` of an ``nn.Conv2d`` plus functional ``conv2d`` calls."""
    modules = dict(gm.named_modules())
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d):
            count += 1
        elif node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            count += 1
    return count


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == snapshot.keys(), "merge changed the input's state_dict keys"
    changed = [k for k, v in snapshot.items() if not torch.equal(state[k], v)]
    assert not changed, f"merge mutated the input model: {changed}"


# ---------------------------------------------------------------------------
# The examples themselves.
# ---------------------------------------------------------------------------

def test_examples_doctests() -> None:
    result = doctest.testmod(B, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.parametrize("make, in_channels", BLOCK_CASES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_block_is_fx_traceable(make: Callable[[], nn.Module], in_channels: int, train: bool) -> None:
    block = _calibrated(make(), in_channels).train(train)
    eager = copy.deepcopy(block)
    traced = fx.symbolic_trace(copy.deepcopy(block))
    x = _input(in_channels)
    with torch.no_grad():
        got, expected = traced(x), eager(x)
    if train and any(isinstance(m, B.BNAndPadLayer) for m in block.modules()):
        # FX evaluates arithmetic on buffers alone while tracing, so the pad value's
        # sqrt(running_var + eps) is frozen as a constant. A train-mode forward updates
        # running_var first, so only the eval-mode trace is faithful for DBB.
        assert got.shape == expected.shape
    else:
        assert torch.equal(got, expected)


# ---------------------------------------------------------------------------
# Test A: the block's own reference merge equals its eval forward.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, in_channels", BLOCK_CASES)
def test_reference_merge_matches_block(make: Callable[[], nn.Module], in_channels: int) -> None:
    block = _calibrated(make(), in_channels)
    x = _input(in_channels)
    weight, bias = block.reference_merge()
    assert weight.requires_grad and bias.requires_grad, "reference merge should be differentiable"
    with torch.no_grad():
        merged = F.conv2d(x, weight, bias, **block.merged_conv_kwargs())
        linear = _without_activation(block)(x)
        assert merged.shape == linear.shape
        assert _rel_err(merged, linear) <= REL_TOL
        assert _rel_err(block.reference_forward(x), block(x)) <= REL_TOL
        assert _rel_err(block.reference_conv()(x), linear) <= REL_TOL


@pytest.mark.parametrize("block_cls", NET_BLOCKS)
def test_reference_deploy_net(block_cls: type[nn.Module]) -> None:
    net = _calibrated(B.RepVGGNet(block=block_cls), 1, spatial=(28, 28))
    deployed = B.reference_deploy(net).eval()
    x = _input(1, batch=4, spatial=(28, 28))
    with torch.no_grad():
        assert _rel_err(deployed(x), net(x)) <= REL_TOL
    assert sum(isinstance(m, nn.Conv2d) for m in deployed.modules()) == 9
    # docs/fashion-mnist-baseline.md: 481,482 parameters after merging (9 conv3x3 with bias + the head).
    assert sum(p.numel() for p in deployed.parameters()) == 481_482


def test_repvgg_net_architecture() -> None:
    net = B.RepVGGNet()
    assert sum(p.numel() for p in net.parameters()) == 537_674  # docs/fashion-mnist-baseline.md
    identity = [blk.rbr_identity is not None for stage in net.stages for blk in stage]
    assert identity == [False, True, True] * 3
    shapes = []
    x = torch.randn(1, 1, 28, 28)
    for stage in net.stages:
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(32, 14, 14), (64, 7, 7), (128, 4, 4)]


# ---------------------------------------------------------------------------
# Test B: the repq_fx.merge contract.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, in_channels", BLOCK_CASES)
def test_merge_block(make: Callable[[], nn.Module], in_channels: int) -> None:
    block = _calibrated(make(), in_channels)
    x = _input(in_channels)
    with torch.no_grad():
        expected = block(x)
    before = _snapshot(block)

    merged = repq_fx.merge(block)

    assert isinstance(merged, fx.GraphModule)
    assert _conv_count(merged) == 1, merged.code
    with torch.no_grad():
        assert _rel_err(merged.eval()(x), expected) <= REL_TOL
    _assert_unchanged(block, before)
    assert not block.training
    with torch.no_grad():
        assert torch.equal(block(x), expected)


@pytest.mark.parametrize("make, in_channels", BLOCK_CASES)
def test_merge_block_given_in_train_mode(make: Callable[[], nn.Module], in_channels: int) -> None:
    block = _calibrated(make(), in_channels).train()
    before = _snapshot(block)

    merged = repq_fx.merge(block)

    assert block.training, "merge must not switch the input model's mode"
    _assert_unchanged(block, before)
    assert _conv_count(merged) == 1, merged.code
    x = _input(in_channels)
    with torch.no_grad():
        assert _rel_err(merged.eval()(x), block.eval()(x)) <= REL_TOL


@pytest.mark.parametrize("block_cls", NET_BLOCKS)
def test_merge_net(block_cls: type[nn.Module]) -> None:
    net = _calibrated(B.RepVGGNet(block=block_cls), 1, spatial=(28, 28))
    x = _input(1, batch=4, spatial=(28, 28))
    with torch.no_grad():
        expected = net(x)
    before = _snapshot(net)

    merged = repq_fx.merge(net)

    assert isinstance(merged, fx.GraphModule)
    assert _conv_count(merged) == 9, merged.code
    with torch.no_grad():
        assert _rel_err(merged.eval()(x), expected) <= REL_TOL
    _assert_unchanged(net, before)
