"""Whole example networks, in ordinary PyTorch as their authors write them (no repq_fx code).

Sized for 28x28 grey images (Fashion-MNIST) and small SR patches on 2 CPU cores:

- ``RepVGGNet``: the small RepVGG of ``docs/fashion-mnist-baseline.md`` (widths 32/64/128, 3 blocks per
  stage; :class:`repq_fx.testing.blocks.RepVGGNet` is exactly that net).
- ``QARepVGGNet``: the same net with YOLOv6's QARepVGG blocks.
- ``ACResNet18``, ``DBBResNet18``, ``OREPAResNet18``: ResNet-18 (BasicBlock x 2/2/2/2) whose
  3x3 conv+BN units are ACNet, DBB or OREPA blocks, built the way the ACNet and DBB repositories
  do it, through a "conv builder". Widths 16/32/64/128, a 3x3 stem without max-pool, so
  feature maps are 28, 14, 7 and 4 pixels wide. 1x1 projection shortcuts stay plain conv+BN
  (the DBB builder does the same for 1x1 kernels). ``ResNet18`` is the plain control.
- ``ECBSR``: ECBSR M4C16, x2, on the Y channel: an ECB from 1 to 16 channels, 4 ECBs of 16,
  an ECB (no activation) to ``scale**2`` channels, the input added (broadcast over the
  ``scale**2`` channels: nearest-neighbour upsampling after the pixel shuffle), pixel shuffle.

:data:`NETWORKS` maps each name to an :class:`ExampleNetwork` (constructor, task, input size);
``repq_fx.app.models.resolve_model("examples:NAME")`` builds them.

>>> net = NETWORKS["ACResNet18"].build()
>>> net(torch.randn(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ..testing.blocks import (ACBlock, DiverseBranchBlock, ECB, OREPABlock, QARepVGGBlock, RepVGGNet,
                              conv_bn)

__all__ = [
    "ACNetBuilder", "BasicBlock", "ConvBuilder", "DBBBuilder", "ECBSR", "ExampleNetwork", "NETWORKS",
    "OREPABuilder", "QARepVGGNet", "ResNet18", "RepVGGNet", "build_network",
]


# ---------------------------------------------------------------------------
# RepVGG.
# ---------------------------------------------------------------------------

class QARepVGGNet(RepVGGNet):
    """:class:`~repq_fx.testing.blocks.RepVGGNet` with
    :class:`~repq_fx.testing.blocks.QARepVGGBlock` blocks (widths 32/64/128, 3 per stage).

    >>> QARepVGGNet()(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 widths: tuple[int, ...] = (32, 64, 128), blocks_per_stage: int = 3) -> None:
        super().__init__(num_classes, in_channels, QARepVGGBlock, widths, blocks_per_stage)


# ---------------------------------------------------------------------------
# ResNet-18 with re-parametrized conv units (ACNet / DBB / OREPA builders).
# ---------------------------------------------------------------------------

class ConvBuilder:
    """Makes the conv units of a network (ACNet's and DBB's ``ConvBuilder`` idea): the base builder
    gives plain ``conv+BN`` and ``conv+BN+ReLU``; subclasses swap in re-parametrized blocks.

    >>> ConvBuilder().conv_bn_relu(4, 8, 3, stride=2, padding=1)(torch.randn(1, 4, 8, 8)).shape
    torch.Size([1, 8, 4, 4])
    """

    def conv_bn(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                padding: int = 0) -> nn.Module:
        """``BN(conv(x))``.

        >>> type(ConvBuilder().conv_bn(4, 8, 3, padding=1)).__name__
        'Sequential'
        """
        return conv_bn(in_channels, out_channels, kernel_size, stride, padding)

    def conv_bn_relu(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                     padding: int = 0) -> nn.Module:
        """``ReLU(BN(conv(x)))``.

        >>> len(ConvBuilder().conv_bn_relu(4, 8, 3, padding=1))
        2
        """
        return nn.Sequential(self.conv_bn(in_channels, out_channels, kernel_size, stride, padding), nn.ReLU())

    def plain_conv_bn(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                      padding: int = 0) -> nn.Module:
        """``BN(conv(x))`` never re-parametrized (projection shortcuts).

        >>> ACNetBuilder().plain_conv_bn(4, 8, 1).conv.kernel_size
        (1, 1)
        """
        return conv_bn(in_channels, out_channels, kernel_size, stride, padding)


class ACNetBuilder(ConvBuilder):
    """kxk conv+BN units as ACNet's :class:`~repq_fx.testing.blocks.ACBlock` (kxk + kx1 + 1xk, each with BN).

    >>> type(ACNetBuilder().conv_bn(4, 8, 3, padding=1)).__name__
    'ACBlock'
    """

    def conv_bn(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                padding: int = 0) -> nn.Module:
        if kernel_size == 1:
            return super().conv_bn(in_channels, out_channels, kernel_size, stride, padding)
        return ACBlock(in_channels, out_channels, kernel_size, stride, padding)


class DBBBuilder(ConvBuilder):
    """kxk conv+BN(+ReLU) units as :class:`~repq_fx.testing.blocks.DiverseBranchBlock`.

    >>> type(DBBBuilder().conv_bn_relu(4, 8, 3, padding=1)).__name__
    'DiverseBranchBlock'
    """

    def conv_bn(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                padding: int = 0) -> nn.Module:
        if kernel_size == 1 or padding != kernel_size // 2:
            return super().conv_bn(in_channels, out_channels, kernel_size, stride, padding)
        return DiverseBranchBlock(in_channels, out_channels, kernel_size, stride)

    def conv_bn_relu(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                     padding: int = 0) -> nn.Module:
        if kernel_size == 1 or padding != kernel_size // 2:
            return super().conv_bn_relu(in_channels, out_channels, kernel_size, stride, padding)
        return DiverseBranchBlock(in_channels, out_channels, kernel_size, stride, nonlinear=nn.ReLU())


class OREPABuilder(ConvBuilder):
    """kxk conv+BN(+ReLU) units as :class:`~repq_fx.testing.blocks.OREPABlock` (six branches, one BN).

    >>> type(OREPABuilder().conv_bn(4, 8, 3, padding=1)).__name__
    'OREPABlock'
    """

    def conv_bn(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                padding: int = 0) -> nn.Module:
        if kernel_size == 1 or padding != kernel_size // 2:
            return super().conv_bn(in_channels, out_channels, kernel_size, stride, padding)
        return OREPABlock(in_channels, out_channels, kernel_size, stride)

    def conv_bn_relu(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                     padding: int = 0) -> nn.Module:
        if kernel_size == 1 or padding != kernel_size // 2:
            return super().conv_bn_relu(in_channels, out_channels, kernel_size, stride, padding)
        return OREPABlock(in_channels, out_channels, kernel_size, stride, nonlinear=nn.ReLU())


class BasicBlock(nn.Module):
    """ResNet's basic block: ``ReLU(conv_bn(ReLU(conv_bn(x))) + shortcut(x))``, the shortcut a
    1x1 conv+BN where the shape changes.

    >>> BasicBlock(ConvBuilder(), 8, 16, stride=2)(torch.randn(1, 8, 8, 8)).shape
    torch.Size([1, 16, 4, 4])
    """

    expansion = 1

    def __init__(self, builder: ConvBuilder, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = builder.conv_bn_relu(in_planes, planes, 3, stride=stride, padding=1)
        self.conv2 = builder.conv_bn(planes, planes, 3, stride=1, padding=1)
        if stride != 1 or in_planes != planes:
            self.shortcut = builder.plain_conv_bn(in_planes, planes, 1, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small grey images: a 3x3 stem (stride 1, no max-pool), four stages of two
    :class:`BasicBlock` (strides 1, 2, 2, 2), global average pooling and a linear head. Every
    conv unit comes from ``builder`` (plain conv+BN by default).

    >>> net = ResNet18()
    >>> net(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> sum(isinstance(m, nn.Conv2d) for m in net.modules())   # stem + 16 + 3 projections
    20
    """

    def __init__(self, builder: ConvBuilder | None = None, num_classes: int = 10, in_channels: int = 1,
                 widths: tuple[int, int, int, int] = (16, 32, 64, 128),
                 num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        builder = ConvBuilder() if builder is None else builder
        self.stem = builder.conv_bn_relu(in_channels, widths[0], 3, stride=1, padding=1)
        in_planes = widths[0]
        stages = []
        for i, (width, blocks) in enumerate(zip(widths, num_blocks)):
            layers = []
            for j in range(blocks):
                layers.append(BasicBlock(builder, in_planes, width, stride=2 if i > 0 and j == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.stem(x)
        out = self.stage4(self.stage3(self.stage2(self.stage1(out))))
        out = torch.flatten(self.gap(out), 1)
        return self.linear(out)


# ---------------------------------------------------------------------------
# ECBSR.
# ---------------------------------------------------------------------------

class ECBSR(nn.Module):
    """ECBSR (Zhang et al., ACM MM 2021): ``module_nums`` ECBs of ``channel_nums`` channels between
    an input ECB and a linear output ECB to ``colors * scale**2`` channels, plus the input,
    then ``PixelShuffle(scale)``. Defaults: M4C16, x2, one colour (Y), PReLU, no identity.

    >>> ECBSR()(torch.randn(1, 1, 16, 16)).shape
    torch.Size([1, 1, 32, 32])
    """

    def __init__(self, module_nums: int = 4, channel_nums: int = 16, with_idt: bool = False,
                 act_type: str = "prelu", scale: int = 2, colors: int = 1) -> None:
        super().__init__()
        self.module_nums = module_nums
        self.channel_nums = channel_nums
        self.scale = scale
        self.colors = colors
        backbone = [ECB(colors, channel_nums, depth_multiplier=2.0, act_type=act_type, with_idt=with_idt)]
        for _ in range(module_nums):
            backbone.append(ECB(channel_nums, channel_nums, depth_multiplier=2.0, act_type=act_type,
                                with_idt=with_idt))
        backbone.append(ECB(channel_nums, colors * scale * scale, depth_multiplier=2.0, act_type="linear",
                            with_idt=with_idt))
        self.backbone = nn.Sequential(*backbone)
        self.upsampler = nn.PixelShuffle(scale)

    def forward(self, x: Tensor) -> Tensor:
        y = self.backbone(x) + x
        return self.upsampler(y)


# ---------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ExampleNetwork:
    """A registered example: how to build it, what it is for, and the shape of one input (no batch)."""

    build: Callable[..., nn.Module]  # classifiers take num_classes= and in_channels=
    task: str  # "classification" (Fashion-MNIST, 10 classes) or "sr" (x2 super-resolution on Y)
    input_size: tuple[int, ...]
    description: str


NETWORKS: dict[str, ExampleNetwork] = {
    "RepVGGNet": ExampleNetwork(RepVGGNet, "classification", (1, 28, 28),
                                "small RepVGG: 9 blocks, widths 32/64/128 (docs/fashion-mnist-baseline.md)"),
    "QARepVGGNet": ExampleNetwork(QARepVGGNet, "classification", (1, 28, 28),
                                  "the small RepVGG with QARepVGG blocks"),
    "ResNet18": ExampleNetwork(ResNet18, "classification", (1, 28, 28),
                               "plain ResNet-18, widths 16/32/64/128, 3x3 stem without max-pool"),
    "ACResNet18": ExampleNetwork(lambda **kw: ResNet18(ACNetBuilder(), **kw), "classification", (1, 28, 28),
                                 "ResNet-18 with ACNet blocks (kxk + kx1 + 1xk)"),
    "DBBResNet18": ExampleNetwork(lambda **kw: ResNet18(DBBBuilder(), **kw), "classification", (1, 28, 28),
                                  "ResNet-18 with Diverse Branch Blocks"),
    "OREPAResNet18": ExampleNetwork(lambda **kw: ResNet18(OREPABuilder(), **kw), "classification", (1, 28, 28),
                                    "ResNet-18 with OREPA-style blocks"),
    "ECBSR": ExampleNetwork(ECBSR, "sr", (1, 32, 32), "ECBSR M4C16, x2, Y channel"),
}


def build_network(name: str, **options: object) -> nn.Module:
    """A new instance of the registered example network ``name`` (random weights); ``options``
    (the classifiers' ``num_classes`` and ``in_channels``) go to its constructor.

    >>> type(build_network("DBBResNet18").stem).__name__
    'DiverseBranchBlock'
    >>> build_network("ACResNet18", num_classes=3).linear.out_features
    3
    """
    if name not in NETWORKS:
        raise KeyError(f"no example network {name!r}; known: {', '.join(NETWORKS)}")
    return NETWORKS[name].build(**options)
