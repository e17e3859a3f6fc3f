"""Example networks (``repq_fx.app.networks``): shapes, sizes, and exact merging.

Every network is checked in float64 with every parameter perturbed and BN running
statistics from a few train-mode forwards (cumulative average), so that zero-initialised
weights (DBB's identity-based 1x1, OREPA's prior scale) take part:

- ``repq_fx.merge(net)`` equals ``net.eval()`` to a relative error of 1e-9, with one conv
  per block, and leaves ``net`` untouched;
- it also equals the blocks' own reference merges (``reference_deploy``), an oracle written
  independently of repq_fx from the papers' formulas.
"""
from __future__ import annotations

import ast
import inspect

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repq_fx
from repq_fx.app import networks as N
from repq_fx.testing import blocks as B
from repq_fx.testing.blocks import ReparamBlock, reference_deploy
from repq_fx.app.models import resolve_model

REL_TOL = 1e-9

# name -> (blocks merged, convs after merging)
EXPECTED = {
    "RepVGGNet": (9, 9),
    "QARepVGGNet": (9, 9),
    "ResNet18": (20, 20),        # stem + 16 conv+BN + 3 projection shortcuts
    "ACResNet18": (20, 20),
    "DBBResNet18": (20, 20),
    "OREPAResNet18": (20, 20),
    "ECBSR": (6, 6),
}


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _calibrated(net: nn.Module, input_size: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        net.train()
        for _ in range(3):
            net(torch.randn(4, *input_size, dtype=torch.float64) + 0.5)
    return net.eval()


def _conv_count(gm: fx.GraphModule) -> int:
    modules = dict(gm.named_modules())
    return sum(1 for n in gm.graph.nodes
               if (n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d))
               or (n.op == "call_function" and n.target in (F.conv2d, torch.conv2d)))


def test_registry_covers_the_expected_networks() -> None:
    assert set(N.NETWORKS) == set(EXPECTED)
    for name, info in N.NETWORKS.items():
        assert info.task in ("classification", "sr") and info.description
        assert type(resolve_model(f"examples:{name}")) is type(info.build())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_merge_is_exact_with_one_conv_per_block(name: str) -> None:
    info = N.NETWORKS[name]
    net = _calibrated(info.build(), info.input_size)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(3, *info.input_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    report = repq_fx.explain(net)
    merged = repq_fx.merge(net)
    with torch.no_grad():
        expected = net(x)
        got = merged(x)
        oracle = reference_deploy(net)(x)
    assert _rel_err(got, expected) <= REL_TOL
    assert _rel_err(oracle, expected) <= REL_TOL
    blocks, convs = EXPECTED[name]
    assert (len(report.merged), len(report.blocks)) == (blocks, blocks), str(report)
    assert _conv_count(merged) == convs
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items()), "merge mutated the network"
    assert not net.training


@pytest.mark.parametrize("name", sorted(n for n, i in N.NETWORKS.items() if i.task == "classification"))
def test_classifiers_take_28x28_grey_images(name: str) -> None:
    net = N.build_network(name)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_repvgg_is_the_baseline_net() -> None:
    """docs/fashion-mnist-baseline.md: 537,674 parameters at train time, 481,482 after merging (9 conv3x3 + head)."""
    net = N.build_network("RepVGGNet").eval()
    assert sum(p.numel() for p in net.parameters()) == 537_674
    assert sum(p.numel() for p in repq_fx.merge(net).parameters()) == 481_482
    blocks = [m for m in net.modules() if isinstance(m, ReparamBlock)]
    assert [b.stride for b in blocks] == [2, 1, 1] * 3
    assert [b.rbr_identity is not None for b in blocks] == [False, True, True] * 3


def test_resnet18_feature_maps_are_28_14_7_4() -> None:
    for name in ("ResNet18", "ACResNet18", "DBBResNet18", "OREPAResNet18"):
        net = N.build_network(name)
        sizes = []
        x = net.stem(torch.randn(1, 1, 28, 28))
        for stage in (net.stage1, net.stage2, net.stage3, net.stage4):
            x = stage(x)
            sizes.append((x.shape[1], x.shape[-1]))
        assert sizes == [(16, 28), (32, 14), (64, 7), (128, 4)], name
        assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())


def test_ecbsr_m4c16_x2() -> None:
    net = N.ECBSR()
    x = torch.rand(1, 1, 12, 10)
    assert net(x).shape == (1, 1, 24, 20)
    assert len(net.backbone) == 6 and net.backbone[1].out_channels == 16 and net.backbone[-1].out_channels == 4
    # The long skip adds the input to every sub-pixel: with a zero backbone, the output is
    # nearest-neighbour upsampling.
    with torch.no_grad():
        last = net.backbone[-1]
        for p in last.parameters():
            p.zero_()
    assert torch.equal(net(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_networks_are_plain_pytorch() -> None:
    """The networks use no repq_fx code but the reference blocks, themselves plain PyTorch."""
    tree = ast.parse(inspect.getsource(N))
    relative = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    absolute = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
    absolute += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert relative == ["testing.blocks"] and not [m for m in absolute if m.startswith("repq_fx")]
    source = inspect.getsource(B)
    assert "import repq_fx" not in source and "from repq_fx" not in source and "from ." not in source
