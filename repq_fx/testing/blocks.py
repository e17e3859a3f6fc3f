"""Re-parametrized training-time blocks, written as their authors wrote them.

Each block is an ordinary ``nn.Module`` whose ``forward`` is the multi-branch
training form, kept traceable by ``torch.fx.symbolic_trace``: no slice assignment
into activations, no ``int()`` on shapes, no data-dependent control flow. Python
``if``/``hasattr`` on module structure is fine (FX resolves it while tracing).

Each block also has its own ``reference_merge()``: the ``(weight, bias)`` of the one
conv that equals the block's eval-mode output (BN running statistics), computed
from the formulas of the re-parametrization papers. It is an oracle for the merge
pass, written independently of it: every kernel is first expanded to a dense
``[O, I, kh, kw]`` kernel (groups 1), branches are combined there, and the result
is cut back to the block's groups at the end.

Blocks and their sources (see the design table at the end of ``docs/algebra.md``):

- :class:`RepVGGBlock`: DingXiaoH/RepVGG ``repvgg.py``.
- :class:`QARepVGGBlock`, :class:`QARepVGGBlockV2`: meituan/YOLOv6 ``common.py``.
- :class:`ACBlock`: DingXiaoH/ACNet ``acnet/acb.py``.
- :class:`DiverseBranchBlock`: DingXiaoH/DiverseBranchBlock ``diversebranchblock.py``.
- :class:`OREPABlock`: the branches of JUGGHM/OREPA_CVPR2022 ``OREPA`` as parallel convs.
- :class:`ECB`: xindongzhang/ECBSR ``models/ecb.py``.
- :class:`ReparamLargeKernelConv`: DingXiaoH/RepLKNet-pytorch ``replknet.py``.
- :class:`DilatedReparamBlock`: AILab-CVC/UniRepLKNet ``unireplknet.py``.
- :class:`RepVGGNet`: a 9-block RepVGG for 28x28 grey images (Fashion-MNIST).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACBlock",
    "BNAndPadLayer",
    "DilatedReparamBlock",
    "DiverseBranchBlock",
    "ECB",
    "IdentityBasedConv1x1",
    "OREPABlock",
    "QARepVGGBlock",
    "QARepVGGBlockV2",
    "ReparamBlock",
    "ReparamLargeKernelConv",
    "RepVGGBlock",
    "RepVGGNet",
    "SeqConv3x3",
    "conv_bn",
    "reference_deploy",
]


# ---------------------------------------------------------------------------
# Reference-merge helpers (plain, differentiable tensor code; never traced).
# ---------------------------------------------------------------------------

def _fold_bn(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """R1: ``BN(conv(x; weight, bias))`` as one conv, with running statistics."""
    t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean if bias is None else bias - bn.running_mean
    return weight * t.reshape(-1, 1, 1, 1), bn.bias + shift * t


def _fold_conv_bn(seq: nn.Module) -> tuple[Tensor, Tensor]:
    """R1 on a :func:`conv_bn` pair."""
    return _fold_bn(seq.conv.weight, seq.conv.bias, seq.bn)


def _pad_to(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """R4: zero-pad a kernel symmetrically to ``size`` (the small kernel's centre stays the centre)."""
    kh, kw = weight.shape[-2:]
    ph, pw = size[0] - kh, size[1] - kw
    if ph < 0 or pw < 0 or ph % 2 or pw % 2:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {size[0]}x{size[1]}")
    return F.pad(weight, [pw // 2, pw // 2, ph // 2, ph // 2])


def _dense(weight: Tensor, groups: int) -> Tensor:
    """R5: a grouped kernel ``[O, I/g, kh, kw]`` as the equivalent dense ``[O, I, kh, kw]`` kernel."""
    out_c, in_per_group, kh, kw = weight.shape
    per_group = weight.reshape(groups, out_c // groups, 1, in_per_group, kh, kw)
    eye = torch.eye(groups, dtype=weight.dtype, device=weight.device).reshape(groups, 1, groups, 1, 1, 1)
    return (per_group * eye).reshape(out_c, groups * in_per_group, kh, kw)


def _grouped(dense: Tensor, groups: int) -> Tensor:
    """Inverse of :func:`_dense`: keep the diagonal blocks of a dense kernel (the rest must be zero)."""
    out_c, in_c, kh, kw = dense.shape
    blocks = dense.reshape(groups, out_c // groups, groups, in_c // groups, kh, kw)
    diag = torch.diagonal(blocks, dim1=0, dim2=2)  # [O/g, I/g, kh, kw, g]
    return diag.permute(4, 0, 1, 2, 3).reshape(out_c, in_c // groups, kh, kw)


def _identity_dense(channels: int, size: tuple[int, int], like: Tensor) -> Tensor:
    """R2: dense kernel of ``y = x``: 1 at ``[c, c, centre]``."""
    eye = torch.eye(channels, dtype=like.dtype, device=like.device)
    return _pad_to(eye.reshape(channels, channels, 1, 1), size)


def _avg_dense(channels: int, size: tuple[int, int], like: Tensor) -> Tensor:
    """R9: dense kernel of ``AvgPool2d(size)`` with ``count_include_pad=True``."""
    eye = torch.eye(channels, dtype=like.dtype, device=like.device).reshape(channels, channels, 1, 1)
    return eye * torch.full(size, 1.0 / (size[0] * size[1]), dtype=like.dtype, device=like.device)


def _compose_1x1_kxk(
    first_w: Tensor, first_b: Tensor | None, second_w: Tensor, second_b: Tensor | None
) -> tuple[Tensor, Tensor]:
    """R6 on dense kernels: 1x1 conv ``(first_w, first_b)``, its output padded with
    ``first_b`` (zeros if None), then the kxk conv ``(second_w, second_b)`` without padding.
    The result is one kxk conv on the zero-padded input."""
    weight = torch.einsum("edhw,dc->echw", second_w, first_w[:, :, 0, 0])
    bias = second_w.new_zeros(second_w.shape[0])
    if first_b is not None:
        bias = bias + torch.einsum("edhw,d->e", second_w, first_b)
    if second_b is not None:
        bias = bias + second_b
    return weight, bias


def _undilate(weight: Tensor, dilation: int) -> Tensor:
    """R11: a dilated kernel as a dense kernel of size ``dilation * (k - 1) + 1``."""
    kh, kw = weight.shape[-2:]
    out = weight.new_zeros(*weight.shape[:2], dilation * (kh - 1) + 1, dilation * (kw - 1) + 1)
    out[:, :, ::dilation, ::dilation] = weight
    return out


# ---------------------------------------------------------------------------
# Common pieces.
# ---------------------------------------------------------------------------

def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    dilation: int = 1,
) -> nn.Sequential:
    """``Conv2d(bias=False)`` then ``BatchNorm2d``, as ``nn.Sequential(conv=..., bn=...)`` (RepVGG's helper).

    >>> conv_bn(4, 8, 3, padding=1)(torch.randn(1, 4, 5, 5)).shape
    torch.Size([1, 8, 5, 5])
    """
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                        dilation=dilation, groups=groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(out_channels))
    return result


class ReparamBlock(nn.Module):
    """Base of the example blocks: a multi-branch ``forward`` plus its own reference merge.

    Subclasses implement :meth:`reference_merge` and :meth:`merged_conv_kwargs`, and
    name the activation applied after the branch sum in ``activation_name`` (None if
    there is none). The merged block is ``activation(conv2d(x, W, b, **kwargs))``.

    >>> block = RepVGGBlock(4, 4).double().eval()
    >>> x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    >>> torch.allclose(block(x), block.reference_forward(x))
    True
    """

    activation_name: ClassVar[str | None] = None

    def reference_merge(self) -> tuple[Tensor, Tensor]:
        """``(weight, bias)`` of the single conv equal to the block before its activation (eval mode)."""
        raise NotImplementedError

    def merged_conv_kwargs(self) -> dict[str, Any]:
        """``stride``, ``padding``, ``dilation`` and ``groups`` of the merged conv."""
        raise NotImplementedError

    def activation(self) -> nn.Module:
        """The module applied after the branch sum (``nn.Identity()`` if none)."""
        return nn.Identity() if self.activation_name is None else getattr(self, self.activation_name)

    def reference_conv(self) -> nn.Conv2d:
        """A new ``nn.Conv2d`` holding :meth:`reference_merge` (detached copies)."""
        weight, bias = self.reference_merge()
        kwargs = self.merged_conv_kwargs()
        conv = nn.Conv2d(weight.shape[1] * kwargs["groups"], weight.shape[0], tuple(weight.shape[-2:]),
                         bias=True, device=weight.device, dtype=weight.dtype, **kwargs)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        return conv

    def reference_forward(self, x: Tensor) -> Tensor:
        """The deploy-time forward: merged conv, then the block's activation."""
        weight, bias = self.reference_merge()
        return self.activation()(F.conv2d(x, weight, bias, **self.merged_conv_kwargs()))


def reference_deploy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every :class:`ReparamBlock` replaced by its merged conv
    and activation (RepVGG's ``repvgg_model_convert``, using the reference merges).

    >>> net = RepVGGNet().eval()
    >>> deployed = reference_deploy(net)
    >>> sum(isinstance(m, nn.Conv2d) for m in deployed.modules())
    9
    """
    model = copy.deepcopy(model)
    if isinstance(model, ReparamBlock):
        return nn.Sequential(model.reference_conv(), model.activation())
    _replace_blocks(model)
    return model


def _replace_blocks(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, ReparamBlock):
            setattr(module, name, nn.Sequential(child.reference_conv(), child.activation()))
        else:
            _replace_blocks(child)


# ---------------------------------------------------------------------------
# RepVGG and QARepVGG.
# ---------------------------------------------------------------------------

class RepVGGBlock(ReparamBlock):
    """RepVGG: ``ReLU(BN(conv kxk) + BN(conv 1x1) [+ BN(x)])``; the identity BN exists iff
    ``in_channels == out_channels`` and ``stride == 1``.

    The original asserts ``kernel_size == 3``; any odd size works the same way (timm).

    >>> block = RepVGGBlock(8, 16, stride=2)
    >>> block(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 16, 5, 5])
    """

    activation_name = "nonlinearity"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        padding = kernel_size // 2
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_identity = (nn.BatchNorm2d(in_channels)
                             if out_channels == in_channels and stride == 1 else None)
        self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, padding - kernel_size // 2, groups)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))

    def merged_conv_kwargs(self) -> dict[str, Any]:
        p = self.kernel_size // 2
        return {"stride": (self.stride, self.stride), "padding": (p, p), "dilation": (1, 1),
                "groups": self.groups}

    def reference_merge(self) -> tuple[Tensor, Tensor]:
        size = (self.kernel_size, self.kernel_size)
        weight, bias = _fold_conv_bn(self.rbr_dense)
        w1, b1 = _fold_conv_bn(self.rbr_1x1)
        weight, bias = weight + _pad_to(w1, size), bias + b1
        if self.rbr_identity is not None:
            identity = _grouped(_identity_dense(self.in_channels, size, weight), self.groups)
            w_id, b_id = _fold_bn(identity, None, self.rbr_identity)
            weight, bias = weight + w_id, bias + b_id
        return weight, bias


class QARepVGGBlock(ReparamBlock):
    """YOLOv6 QARepVGG: ``ReLU(BN_post(BN(conv kxk) + conv 1x1 [+ x]))``; no BN on the 1x1 and
    identity branches. The identity exists iff ``in_channels == out_channels`` and ``stride == 1``.

    >>> block = QARepVGGBlock(8, 8)
    >>> block(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 8, 10, 10])
    """

    activation_name = "nonlinearity"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        padding = kernel_size // 2
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.rbr_1x1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride,
                                 groups=groups, bias=False)
        self.rbr_identity = (nn.Identity()
                             if out_channels == in_channels and stride == 1 else None)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)))

    def merged_conv_kwargs(self) -> dict[str, Any]:
        p = self.kernel_size // 2
        return {"stride": (self.stride, self.stride), "padding": (p, p), "dilation": (1, 1),
                "groups": self.groups}

    def _branch_sum(self) -> tuple[Tensor, Tensor]:
        size = (self.kernel_size, self.kernel_size)
        weight, bias = _fold_conv_bn(self.rbr_dense)
        weight = weight + _pad_to(self.rbr_1x1.weight, size)
        if self.rbr_identity is not None:
            weight = weight + _grouped(_identity_dense(self.in_channels, size, weight), self.groups)
        return weight, bias

    def reference_merge(self) -> tuple[Tensor, Tensor]:
        weight, bias = self._branch_sum()
        return _fold_bn(weight, bias, self.bn)


class QARepVGGBlockV2(QARepVGGBlock):
    """YOLOv6 QARepVGG V2: :class:`QARepVGGBlock` plus an ``AvgPool2d(k, stride, k//2)`` branch
    (present, like the identity, iff ``in_channels == out_channels`` and ``stride == 1``).

    >>> block = QARepVGGBlockV2(8, 8)
    >>> block(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 8, 10, 10])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, groups)
        self.rbr_avg = (nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=kernel_size // 2)
                        if out_channels == in_channels and stride == 1 else None)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        if self.rbr_avg is None:
            avg_out = 0
        else:
            avg_out = self.rbr_avg(inputs)
        return self.nonlinearity(self.bn(self.se(
            self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out + avg_out)))

    def reference_merge(self) -> tuple[Tensor, Tensor]:
        weight, bias = self._branch_sum()
        if self.rbr_avg is not None:
            size = (self.kernel_size, self.kernel_size)
            weight = weight + _grouped(_avg_dense(self.in_channels, size, weight), self.groups)
        return _fold_bn(weight, bias, self.bn)


# ---------------------------------------------------------------------------
# ACNet.
# ---------------------------------------------------------------------------

class ACBlock(ReparamBlock):
    """ACNet asymmetric conv block: ``BN(conv kxk) + BN(conv kx1) + BN(conv 1xk)``, no activation.

    ``padding`` defaults to ``kernel_size // 2`` (the original defaults to 0). With
    ``padding < kernel_size // 2`` the asymmetric branches read a cropped input
    (``x[:, :, :, c:-c]`` and ``x[:, :, c:-c, :]``, ``c = kernel_size // 2 - padding``).

    >>> block = ACBlock(8, 8, 3, padding=0)
    >>> block(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int | None = None, groups: int = 1) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        padding = kernel_size // 2 if padding is None else padding
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.groups = groups
        self.square_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), stride,
                                     padding, groups=groups, bias=False)
        self.square_bn = nn.BatchNorm2d(out_channels)
        if padding - kernel_size // 2 >= 0:
            # Align the sliding windows of the 1xk / kx1 convs with the kxk (Fig. 2 of the paper).
            self.crop = 0
            hor_padding = (padding - kernel_size // 2, padding)
            ver_padding = (padding, padding - kernel_size // 2)
        else:
            # A negative "padding" is a crop; nn.Conv2d cannot do it, so crop the input.
            self.crop = kernel_size // 2 - padding
            hor_padding = (0, padding)
            ver_padding = (padding, 0)
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), stride, ver_padding,
                                  groups=groups, bias=False)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), stride, hor_padding,
                                  groups=groups, bias=False)
        self.ver_bn = nn.BatchNorm2d(out_channels)
        self.hor_bn = nn.BatchNorm2d(out_channels)

    def forward(self, inputs: Tensor) -> Tensor:
        square_outputs = self.square_bn(self.square_conv(inputs))
        if self.crop > 0:
            ver_input = inputs[:, :, :, self.crop:-self.crop]
            hor_input = inputs[:, :, self.crop:-self.crop, :]
        else:
            ver_input = inputs
            hor_input = inputs
        vertical_outputs = self.ver_bn(self.ver_conv(ver_input))
        horizontal_outputs = self.hor_bn(self.hor_conv(hor_input))
        return square_outputs + vertical_outputs + horizontal_outputs

    def merged_conv_kwargs(self) -> dict[str, Any]:
        return {"stride": (self.stride, self.stride), "padding": (self.padding, self.padding),
                "dilation": (1, 1), "groups": self.groups}

    def reference_merge(self) -> tuple[Tensor, Tensor]:
        size = (self.kernel_size, self.kernel_size)
        weight, bias = _fold_bn(self.square_conv.weight, None, self.square_bn)
        w_ver, b_ver = _fold_bn(self.ver_conv.weight, None, self.ver_bn)
        w_hor, b_hor = _fold_bn(self.hor_conv.weight, None, self.hor_bn)
        return weight + _pad_to(w_ver, size) + _pad_to(w_hor, size), bias + b_ver + b_hor


# ---------------------------------------------------------------------------
# Diverse Branch Block.
# ---------------------------------------------------------------------------

class BNAndPadLayer(nn.Module):
    """BatchNorm, then pad by ``pad_pixels`` with the BN's response to a zero input
    ``beta - running_mean * gamma / sqrt(running_var + eps)`` (DBB), written without
    slice assignment so FX can trace it.

    >>> layer = BNAndPadLayer(1, 4).eval()
    >>> layer(torch.randn(2, 4, 5, 5)).shape
    torch.Size([2, 4, 7, 7])
    """

    def __init__(self, pad_pixels: int, num_features: int, eps: float = 1e-5,
                 momentum: float | None = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum)
        self.pad_pixels = pad_pixels

    def forward(self, inputs: Tensor) -> Tensor:
        output = self.bn(inputs)
        if self.pad_pixels > 0:
            pad_values = (self.bn.bias - self.bn.running_mean * self.bn.weight
                          / torch.sqrt(self.bn.running_var + self.bn.eps)).view(1, -1, 1, 1)
            output = F.pad(output - pad_values, [self.pad_pixels] * 4) + pad_values
        return output


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's 1x1 conv whose effective kernel is ``weight + identity`` (weight starts at 0).

    >>> conv = IdentityBasedConv1x1(4)
    >>> x = torch.randn(1, 4, 3, 3)
    >>> torch.equal(conv(x), x)
    True
    """

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        input_dim = channels // groups
        id_value = torch.zeros(channels, input_dim, 1, 1)
        rows = torch.arange(channels)
        id_value[rows, rows % input_dim] = 1.0
        self.register_buffer("id_tensor", id_value, persistent=False)
        nn.init.zeros_(self.weight)

    def get_actual_kernel(self) -> Tensor:
        """``weight + identity``: the kernel the forward uses."""
        return self.weight + self.id_tensor

    def forward(self, inputs: Tensor) -> Tensor:
        kernel = self.weight + self.id_tensor
        return F.conv2d(inputs, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)


class DiverseBranchBlock(ReparamBlock):
    """DBB: ``BN(conv kxk) + BN(conv 1x1) + BN(avg(BNpad(conv 1x1))) + BN(conv kxk(BNpad(conv 1x1)))``.

    When ``groups >= out_channels`` (depthwise) the 1x1 branch is absent and the avg
    branch is ``BN(AvgPool2d(k, stride, k//2)(x))``, which needs ``in == out``. The
    1x1 -> kxk branch uses :class:`IdentityBasedConv1x1` when its internal width equals
    ``in_channels`` (the default unless depthwise, where it is ``2 * in_channels``).
    Dilation is not supported (the original only applies it to one branch).

    >>> block = DiverseBranchBlock(8, 16, 3, stride=2)
    >>> block(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 16, 5, 5])
    """

    activation_name = "nonlinear"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, groups: int = 1, internal_channels_1x1_3x3: int | None = None,
                 nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if groups >= out_channels and in_channels != out_channels:
            raise ValueError("the depthwise DBB (groups >= out_channels) needs in_channels == out_channels")
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        padding = kernel_size // 2

        self.dbb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)

        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1,
                                                      padding=0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(pad_pixels=padding, num_features=out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=0))
            self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))

        if internal_channels_1x1_3x3 is None:
            # For MobileNet-style depthwise blocks it is better to have 2x internal channels.
            internal_channels_1x1_3x3 = in_channels if groups < out_channels else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal_channels_1x1_3x3 == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups=groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal_channels_1x1_3x3, kernel_size=1,
                                                           stride=1, padding=0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(pad_pixels=padding, num_features=internal_channels_1x1_3x3))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal_channels_1x1_3x3, out_channels, kernel_size,
                                                       stride=stride, padding=0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, inputs: Tensor) -> Tensor:
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)

    def merged_conv_kwargs(self) -> dict[str, Any]:
        p = self.kernel_size // 2
        return {"stride": (self.stride, self.stride), "padding": (p, p), "dilation": (1, 1),
                "groups": self.groups}

    def reference_merge(self) -> tuple[Tensor, Tensor]:
        g = self.groups
        size = (self.kernel_size, self.kernel_size)
        weight, bias = _fold_conv_bn(self.dbb_origin)
        weight = _dense(weight, g)

        if hasattr(self, "dbb_1x1"):
            w, b = _fold_conv_bn(self.dbb_1x1)
            weight, bias = weight + _pad_to(_dense(w, g), size), bias + b

        avg = _avg_dense(self.out_channels, size, weight)
        if hasattr(self.dbb_avg, "conv"):
            first_w, first_b = _fold_bn(self.dbb_avg.conv.weight, None, self.dbb_avg.bn.bn)
            w, b = _compose_1x1_kxk(_dense(first_w, g), first_b, avg, None)
        else:
            w, b = avg, None
        w, b = _fold_bn(w, b, self.dbb_avg.avgbn)
        weight, bias = weight + w, bias + b

        seq = self.dbb_1x1_kxk
        first = seq.idconv1.get_actual_kernel() if hasattr(seq, "idconv1") else seq.conv1.weight
        first_w, first_b = _fold_bn(first, None, seq.bn1.bn)
        w, b = _compose_1x1_kxk(_dense(first_w, g), first_b, _dense(seq.conv2.weight, g), None)
        w, b = _fold_bn(w, b, seq.bn2)
        weight, bias = weight + w, bias + b
        return _grouped(weight, g), bias


# ---------------------------------------------------------------------------
# OREPA, training form as parallel branches.
# ---------------------------------------------------------------------------

def _frequency_prior(channels: int, kernel_size: int) -> Tensor:
    """OREPA's fixed DCT-like prior ``[C, 1, k, k]``: cosines along h for the first half of
    the channels, along w for the second half (OREPA hard-codes k = 3)."""
    half = channels / 2
    i = torch.arange(channels, dtype=torch.float64).reshape(-1, 1, 1)
    h = torch.arange(kernel_size, dtype=torch.float64).reshape(1, -1, 1)
    w = torch.arange(kernel_size, dtype=torch.float64).reshape(1, 1, -1)
    along_h = torch.cos(math.pi * (h + 0.5) * (i + 1) / kernel_size).expand(-1, -1, kernel_size)
    along_w = torch.cos(math.pi * (w + 0.5) * (i + 1 - half) / kernel_size).expand(-1, kernel_size, -1)
    prior = torch.where(i < half, along_h, along_w)
    return prior.unsqueeze(1).to(torch.get_default_dtype())


class OREPABlock(ReparamBlock):
    """OREPA's six branches written as parallel convs, each scaled per output channel by a row
    of ``vector``, summed, then one BN (and ``nonlinear``, Identity by default).

    Branches: ``0`` kxk conv; ``1`` 1x1 conv -> ``AvgPool2d(k, stride, k//2)``; ``2`` a conv whose
    kernel is a learned ``[O, I/g, 1, 1]`` weight times a fixed frequency prior buffer
    ``[O, 1, k, k]``; ``3`` 1x1 -> kxk (no BN, no bias between them); ``4`` 1x1 conv;
    ``5`` depthwise kxk (``expand_ratio`` outputs per input) -> pointwise 1x1.
    (The original computes one kernel online from the same parameters.)

    >>> block = OREPABlock(8, 16, 3)
    >>> block(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 16, 10, 10])
    """

    activation_name = "nonlinear"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, groups: int = 1, internal_channels_1x1_kxk: int | None = None,
                 expand_ratio: int = 8, nonlinear: nn.Module | None = None) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        self.groups = groups
        k, p = kernel_size, kernel_size // 2
        if internal_channels_1x1_kxk is None:
            internal_channels_1x1_kxk = in_channels if groups < out_channels else 2 * in_channels

        self.branch_origin = nn.Conv2d(in_channels, out_channels, k, stride, p, groups=groups, bias=False)
        self.branch_avg_conv = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)
        self.branch_avg_pool = nn.AvgPool2d(k, stride, p)
        self.weight_prior_conv = nn.Parameter(torch.empty(out_channels, in_channels // groups, 1, 1))
        nn.init.kaiming_uniform_(self.weight_prior_conv, a=1.0)
        self.register_buffer("weight_prior", _frequency_prior(out_channels, k))
        self.branch_1x1_kxk_first = nn.Conv2d(in_channels, internal_channels_1x1_kxk, 1,
                                              groups=groups, bias=False)
        self.branch_1x1_kxk_second = nn.Conv2d(internal_channels_1x1_kxk, out_channels, k, stride, p,
                                               groups=groups, bias=False)
        self.branch_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, groups=groups, bias=False)
        self.branch_dw = nn.Conv2d(in_channels, in_channels * expand_ratio, k, stride, p,
                                   groups=in_channels, bias=False)
        self.branch_pw = nn.Conv2d(in_channels * expand_ratio, out_channels, 1, groups=groups, bias=False)
        # OREPA's initial branch weights; the prior branch starts switched off.
        self.vector = nn.Parameter(torch.tensor([0.25, 0.25, 0.0, 0.5, 0.5, 0.5])
                                   .reshape(-1, 1).repeat(1, out_channels))
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, inputs: Tensor) -> Tensor:
        out = self.branch_origin(inputs) * self.vector[0].view(1, -1, 1, 1)
        out = out + self.branch_avg_pool(self.branch_avg_conv(inputs)) * self.vector[1].view(1, -1, 1, 1)
        prior_kernel = self.weight_prior_conv * self.weight_prior
        prior_out = F.conv2d(inputs, prior_kernel, None, self.stride, self.padding, 1, self.groups)
        out = out + prior_out * self.vector[2].view(1, -1, 1, 1)
        out = out + self.branch_1x1_kxk_second(self.branch_1x1_kxk_first(inputs)) * self.vector[3].view(1, -1, 1, 1)
        out = out + self.branch_1x1(inputs) * self.vector[4].view(1, -1, 1, 1)
        out = out + self.branch_pw(self.branch_dw(inputs)) * self.vector[5].view(1, -1, 1, 1)
        return self.nonlinear(self.bn(out))

    def merged_conv_kwargs(self) -> dict[str, Any]:
        return {"stride": (self.stride, self.stride), "padding": (self.padding, self.padding),
                "dilation": (1, 1), "groups": self.groups}

    def reference_merge(self) -> tuple[Tensor, Tensor]:
        g, k = self.groups, self.kernel_size
        size = (k, k)
        origin = self.branch_origin.weight
        avg = self.branch_avg_conv.weight * torch.full(size, 1.0 / (k * k), dtype=origin.dtype, device=origin.device)
        prior = self.weight_prior_conv * self.weight_prior
        seq, _ = _compose_1x1_kxk(_dense(self.branch_1x1_kxk_first.weight, g), None,
                                  _dense(self.branch_1x1_kxk_second.weight, g), None)
        one = _pad_to(self.branch_1x1.weight, size)
        dw = _dense(self.branch_dw.weight, self.branch_dw.groups)  # [I*m, I, k, k]
        pw = _dense(self.branch_pw.weight, g)[:, :, 0, 0]  # [O, I*m]
        dwsc = torch.einsum("oj,jchw->ochw", pw, dw)
        branches = [origin, avg, prior, _grouped(seq, g), one, _grouped(dwsc, g)]
        weight = sum(v.reshape(-1, 1, 1, 1) * w for v, w in zip(self.vector, branches))
        return _fold_bn(weight, None, self.bn)


# ---------------------------------------------------------------------------
# ECB (ECBSR).
# ---------------------------------------------------------------------------

_EDGE_MASKS: dict[str, list[list[float]]] = {
    "conv1x1-sobelx": [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]],
    "conv1x1-sobely": [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]],
    "conv1x1-laplacian": [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]],
}


class SeqConv3x3(nn.Module):
    """ECBSR's sequential branch: 1x1 conv (with bias), pad its output by 1 with that bias,
    then a valid 3x3 conv: dense (``'conv1x1-conv3x3'``) or depthwise ``scale * mask`` with a
    fixed Sobel-x / Sobel-y / Laplacian mask (``'conv1x1-sobelx'``, ``-sobely``, ``-laplacian``).

    >>> branch = SeqConv3x3("conv1x1-sobelx", 4, 8)
    >>> branch(torch.randn(1, 4, 6, 6)).shape
    torch.Size([1, 8, 6, 6])
    """

    def __init__(self, seq_type: str, inp_planes: int, out_planes: int, depth_multiplier: float = 1.0) -> None:
        super().__init__()
        self.type = seq_type
        self.inp_planes = inp_planes
        self.out_planes = out_planes
        if seq_type == "conv1x1-conv3x3":
            self.mid_planes = int(out_planes * depth_multiplier)
            conv0 = nn.Conv2d(inp_planes, self.mid_planes, kernel_size=1, padding=0)
            self.k0 = conv0.weight
            self.b0 = conv0.bias
            conv1 = nn.Conv2d(self.mid_planes, out_planes, kernel_size=3)
            self.k1 = conv1.weight
            self.b1 = conv1.bias
        elif seq_type in _EDGE_MASKS:
            conv0 = nn.Conv2d(inp_planes, out_planes, kernel_size=1, padding=0)
            self.k0 = conv0.weight
            self.b0 = conv0.bias
            self.scale = nn.Parameter(torch.randn(out_planes, 1, 1, 1) * 1e-3)
            self.bias = nn.Parameter(torch.randn(out_planes) * 1e-3)
            mask = torch.tensor(_EDGE_MASKS[seq_type]).reshape(1, 1, 3, 3).repeat(out_planes, 1, 1, 1)
            self.register_buffer("mask", mask)
        else:
            raise ValueError(f"unknown seq_type {seq_type!r}")

    def forward(self, x: Tensor) -> Tensor:
        y0 = F.conv2d(input=x, weight=self.k0, bias=self.b0, stride=1)
        # Pad with the 1x1 conv's bias: its response to the zero padding of x.
        b0_pad = self.b0.view(1, -1, 1, 1)
        y0 = F.pad(y0 - b0_pad, (1, 1, 1, 1)) + b0_pad
        if self.type == "conv1x1-conv3x3":
            return F.conv2d(input=y0, weight=self.k1, bias=self.b1, stride=1)
        return F.conv2d(input=y0, weight=self.scale * self.mask, bias=self.bias, stride=1, groups=self.out_planes)

    def rep_params(self) -> tuple[Tensor, Tensor]:
        """Dense ``[out, inp, 3, 3]`` kernel and bias of one 3x3 conv (padding 1) equal to this branch."""
        if self.type == "conv1x1-conv3x3":
            second_w, second_b = self.k1, self.b1
        else:
            second_w, second_b = _dense(self.scale * self.mask, self.out_planes), self.bias
        return _compose_1x1_kxk(self.k0, self.b0, second_w, second_b)


class ECB(ReparamBlock):
    """ECBSR edge-oriented block: ``act(conv3x3 + conv1x1-conv3x3 + sobel-x + sobel-y +
    laplacian [+ x])``; every conv has a bias, there is no BN. ``act_type`` is ``'prelu'``,
    ``'relu'`` or ``'linear'`` (no activation).

    >>> block = ECB(8, 8, depth_multiplier=2.0, with_idt=True)
    >>> block(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 8, 10, 10])
    """

    activation_name = "act"

    def __init__(self, in_channels: int, out_channels: int, depth_multiplier: float = 2.0,
                 act_type: str = "prelu", with_idt: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.act_type = act_type
        self.with_idt = with_idt and in_channels == out_channels
        self.conv3x3 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.conv1x1_3x3 = SeqConv3x3("conv1x1-conv3x3", in_channels, out_channels, depth_multiplier)
        self.conv1x1_sbx = SeqConv3x3("conv1x1-sobelx", in_channels, out_channels)
        self.conv1x1_sby = SeqConv3x3("conv1x1-sobely", in_channels, out_channels)
        self.conv1x1_lpl = SeqConv3x3("conv1x1-laplacian", in_channels, out_channels)
        if act_type == "prelu":
            self.act = nn.PReLU(num_parameters=out_channels)
        elif act_type == "relu":
            self.act = nn.ReLU(inplace=True)
        elif act_type == "linear":
            self.act = nn.Identity()
        else:
            raise ValueError(f"unknown act_type {act_type!r}")

    def forward(self, x: Tensor) -> Tensor:
        y = (self.conv3x3(x) + self.conv1x1_3x3(x) + self.conv1x1_sbx(x)
             + self.conv1x1_sby(x) + self.conv1x1_lpl(x))
        if self.with_idt:
            y += x
        if self.act_type != "linear":
            y = self.act(y)
        return y

    def merged_conv_kwargs(self) -> dict[str, Any]:
        return {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}

    def reference_merge(self) -> tuple[Tensor, Tensor]:
        weight, bias = self.conv3x3.weight, self.conv3x3.bias
        for branch in (self.conv1x1_3x3, self.conv1x1_sbx, self.conv1x1_sby, self.conv1x1_lpl):
            w, b = branch.rep_params()
            weight, bias = weight + w, bias + b
        if self.with_idt:
            weight = weight + _identity_dense(self.out_channels, (3, 3), weight)
        return weight, bias


# ---------------------------------------------------------------------------
# Large kernels: RepLKNet and UniRepLKNet.
# ---------------------------------------------------------------------------

class ReparamLargeKernelConv(ReparamBlock):
    """RepLKNet: ``BN(conv KxK) + BN(conv small x small)``, depthwise by default (``groups=None``).

    >>> block = ReparamLargeKernelConv(8, 8, kernel_size=13, small_kernel=5)
    >>> block(torch.randn(2, 8, 16, 16)).shape
    torch.Size([2, 8, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 13, stride: int = 1,
                 groups: int | None = None, small_kernel: int | None = 5) -> None:
        super().__init__()
        groups = in_channels if groups is None else groups
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        padding = kernel_size // 2
        self.lkb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
        if small_kernel is not None:
            if small_kernel > kernel_size:
                raise ValueError("small_kernel must not exceed kernel_size")
            self.small_conv = conv_bn(in_channels, out_channels, small_kernel, stride, small_kernel // 2, groups)

    def forward(self, inputs: Tensor) -> Tensor:
        out = self.lkb_origin(inputs)
        if hasattr(self, "small_conv"):
            out += self.small_conv(inputs)
        return out

    def merged_conv_kwargs(self) -> dict[str, Any]:
        p = self.kernel_size // 2
        return {"stride": (self.stride, self.stride), "padding": (p, p), "dilation": (1, 1),
                "groups": self.groups}

    def reference_merge(self) -> tuple[Tensor, Tensor]:
        weight, bias = _fold_conv_bn(self.lkb_origin)
        if hasattr(self, "small_conv"):
            w, b = _fold_conv_bn(self.small_conv)
            weight, bias = weight + _pad_to(w, (self.kernel_size, self.kernel_size)), bias + b
        return weight, bias


_DILATED_BRANCHES: dict[int, tuple[list[int], list[int]]] = {
    17: ([5, 9, 3, 3, 3], [1, 2, 4, 5, 7]),
    15: ([5, 7, 3, 3, 3], [1, 2, 3, 5, 7]),
    13: ([5, 7, 3, 3, 3], [1, 2, 3, 4, 5]),
    11: ([5, 5, 3, 3, 3], [1, 2, 3, 4, 5]),
    9: ([5, 5, 3, 3], [1, 2, 3, 4]),
    7: ([5, 3, 3], [1, 2, 3]),
    5: ([3, 3], [1, 2]),
}


class DilatedReparamBlock(ReparamBlock):
    """UniRepLKNet: depthwise ``BN(conv KxK) + sum_i BN(conv k_i dilated r_i)`` with padding
    ``(r_i * (k_i - 1) + 1) // 2``; for K = 7 the branches are (5, 1), (3, 2), (3, 3).

    >>> block = DilatedReparamBlock(8, kernel_size=7)
    >>> block(torch.randn(2, 8, 12, 12)).shape
    torch.Size([2, 8, 12, 12])
    """

    def __init__(self, channels: int, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size not in _DILATED_BRANCHES:
            raise ValueError(f"kernel_size must be one of {sorted(_DILATED_BRANCHES)}, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, stride=1, padding=kernel_size // 2,
                                   dilation=1, groups=channels, bias=False)
        self.kernel_sizes, self.dilates = _DILATED_BRANCHES[kernel_size]
        self.origin_bn = nn.BatchNorm2d(channels)
        for k, r in zip(self.kernel_sizes, self.dilates):
            self.__setattr__(f"dil_conv_k{k}_{r}",
                             nn.Conv2d(channels, channels, kernel_size=k, stride=1,
                                       padding=(r * (k - 1) + 1) // 2, dilation=r, groups=channels, bias=False))
            self.__setattr__(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            conv = self.__getattr__(f"dil_conv_k{k}_{r}")
            bn = self.__getattr__(f"dil_bn_k{k}_{r}")
            out = out + bn(conv(x))
        return out

    def merged_conv_kwargs(self) -> dict[str, Any]:
        p = self.kernel_size // 2
        return {"stride": (1, 1), "padding": (p, p), "dilation": (1, 1), "groups": self.channels}

    def reference_merge(self) -> tuple[Tensor, Tensor]:
        size = (self.kernel_size, self.kernel_size)
        weight, bias = _fold_bn(self.lk_origin.weight, None, self.origin_bn)
        for k, r in zip(self.kernel_sizes, self.dilates):
            conv = self.__getattr__(f"dil_conv_k{k}_{r}")
            w, b = _fold_bn(conv.weight, None, self.__getattr__(f"dil_bn_k{k}_{r}"))
            weight, bias = weight + _pad_to(_undilate(w, r), size), bias + b
        return weight, bias


# ---------------------------------------------------------------------------
# A small RepVGG network (Fashion-MNIST).
# ---------------------------------------------------------------------------

class RepVGGNet(nn.Module):
    """Three stages of three blocks (widths 32, 64, 128; the first block of each stage has
    stride 2), global average pooling and a linear classifier. For 1x28x28 inputs the
    feature maps are 14x14, 7x7 and 4x4. ``block`` is any block class with the signature
    ``block(in_channels, out_channels, kernel_size, stride)``, e.g. :class:`QARepVGGBlock`.

    >>> net = RepVGGNet()
    >>> net(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in net.parameters())
    537674
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 block: Callable[..., nn.Module] = RepVGGBlock,
                 widths: tuple[int, ...] = (32, 64, 128), blocks_per_stage: int = 3) -> None:
        super().__init__()
        cin = in_channels
        stages = []
        for width in widths:
            layers = []
            for i in range(blocks_per_stage):
                layers.append(block(cin, width, kernel_size=3, stride=2 if i == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.stages(x)
        out = self.gap(out)
        out = torch.flatten(out, 1)
        return self.linear(out)
