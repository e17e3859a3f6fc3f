"""The torch.export capture front end.

Blocks here are written the way the official DBB, ECBSR and OREPA code writes them, which
``torch.fx.symbolic_trace`` cannot trace: slice assignment into a padded tensor, ``int()`` /
tuple unpacking on shapes, branches on ``x.get_device()``. They are written from the algebra
(docs/algebra.md, R1-R6), not copied.

The key fact (R6): a 1x1 conv (+ BN) whose output is padded with its own response to a zero
pixel (the bias, or BN's ``beta - mu * gamma / sigma``), followed by a valid kxk conv, is one
kxk conv on the zero-padded input. The export front end must see the slice-assigned border as
padding with that value, so ``merge`` is exact (float64, relative error <= 1e-9) with one conv.

Checked here:
- merge through ``capture="auto"`` (FX fails, export is used) and ``"export"``: exact, one conv,
  for several input sizes (the capture keeps batch and spatial sizes symbolic);
- the merged kernel equals a reference computed from R1-R6 in this file;
- explain says which front end was used; ``capture="fx"`` refuses; bad values raise ConfigError;
- FX-traceable example blocks give the same result through both front ends, with the same
  parameter and buffer names;
- prepare through export: fake quant off equals the original (eval, and train where the original
  is one conv in train mode), gradients flow, state_dict names are the original ones;
- what cannot be mapped raises a RepQError naming the aten op and the node; a slice assignment
  that is not a padding stays as it is (correct, not merged); a size baked in by ``int()`` on
  shapes is guarded.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repq_fx
from repq_fx.capture import capture
from repq_fx.testing import blocks as B
from repq_fx.app.networks import ConvBuilder, ResNet18

REL_TOL = 1e-9
SPATIAL = (11, 13)


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------

def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _input(channels: int, batch: int = 2, spatial: tuple[int, int] = SPATIAL, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *spatial, generator=g, dtype=torch.float64) + 0.5


def _calibrated(block: nn.Module, channels: int) -> nn.Module:
    """float64, every parameter perturbed, BN running statistics from a few train-mode batches."""
    block = block.double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for m in block.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    block.train()
    with torch.no_grad():
        for seed in range(3):
            block(_input(channels, seed=100 + seed))
    for m in block.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return block.eval()


def _convs(gm: nn.Module) -> int:
    n = sum(isinstance(m, nn.Conv2d) for m in gm.modules())
    if isinstance(gm, fx.GraphModule):
        n += sum(1 for node in gm.graph.nodes if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d))
    return n


def _bns(gm: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())


def _fx_fails(model: nn.Module) -> bool:
    try:
        fx.symbolic_trace(copy.deepcopy(model))
    except Exception:
        return True
    return False


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


# ---------------------------------------------------------------------------
# Blocks in the style of the official code (not FX-traceable).
# ---------------------------------------------------------------------------

def _zero_response(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What eval-mode BN outputs for a zero input: beta - mu * gamma / sigma (gamma, beta detached)."""
    return bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)


class SliceBNPad(nn.Module):
    """BN, then zero-pad by ``p`` and overwrite the four borders with BN's zero response."""

    def __init__(self, channels: int, p: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        p = self.p
        y = F.pad(y, [p, p, p, p])
        v = _zero_response(self.bn).view(1, -1, 1, 1)
        y[:, :, 0:p, :] = v
        y[:, :, -p:, :] = v
        y[:, :, :, 0:p] = v
        y[:, :, :, -p:] = v
        return y


class FullBNPad(nn.Module):
    """BN, then a canvas filled with BN's zero response and the BN output copied into its middle."""

    def __init__(self, channels: int, p: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        n, c, h, w = y.shape
        p = self.p
        out = _zero_response(self.bn).view(1, -1, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
        out[:, :, p:p + h, p:p + w] = y
        return out


class ZerosSelectBNPad(nn.Module):
    """BN, zeros canvas, the BN output copied into ``[1:-1, 1:-1]``, border rows/columns set by integer index."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        n, c, h, w = y.shape
        out = y.new_zeros(n, c, h + 2, w + 2)
        out[:, :, 1:-1, 1:-1] = y
        v = _zero_response(self.bn).view(-1, 1)
        out[:, :, 0] = v
        out[:, :, -1] = v
        out[:, :, :, 0] = v
        out[:, :, :, -1] = v
        return out


class IdentityInit1x1(nn.Conv2d):
    """A 1x1 conv whose kernel is ``weight + identity``; the identity is a plain tensor attribute."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        per_group = channels // groups
        ident = torch.zeros(channels, per_group, 1, 1)
        for i in range(channels):
            ident[i, i % per_group, 0, 0] = 1.0
        self.ident = ident
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.weight + self.ident.to(self.weight.device)
        return F.conv2d(x, kernel, None, 1, 0, 1, self.groups)


class DBBStyle(nn.Module):
    """Diverse branch block: kxk+BN, 1x1+BN, 1x1 -> BN-pad -> avg -> BN, 1x1 -> BN-pad -> kxk -> BN."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 internal: int | None = None, pad_layer: type = SliceBNPad) -> None:
        super().__init__()
        p = k // 2
        self.k, self.stride, self.groups = k, stride, groups
        self.origin = conv_bn(cin, cout, k, stride, p, groups)
        self.one = conv_bn(cin, cout, 1, stride, 0, groups)
        self.avg_conv = nn.Conv2d(cin, cout, 1, groups=groups, bias=False)
        self.avg_pad = pad_layer(cout, p) if pad_layer is not ZerosSelectBNPad else pad_layer(cout)
        self.avg_pool = nn.AvgPool2d(k, stride, 0)
        self.avg_bn = nn.BatchNorm2d(cout)
        internal = internal or cin
        self.seq_conv1 = (IdentityInit1x1(cin, groups) if internal == cin
                          else nn.Conv2d(cin, internal, 1, groups=groups, bias=False))
        self.seq_pad = pad_layer(internal, p) if pad_layer is not ZerosSelectBNPad else pad_layer(internal)
        self.seq_conv2 = nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False)
        self.seq_bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.origin(x)
        out += self.one(x)
        out += self.avg_bn(self.avg_pool(self.avg_pad(self.avg_conv(x))))
        out += self.seq_bn(self.seq_conv2(self.seq_pad(self.seq_conv1(x))))
        return out


_MASKS = {
    "sobelx": [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]],
    "sobely": [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]],
    "laplacian": [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]],
}


class SeqBiasPad(nn.Module):
    """1x1 conv with bias, output zero-padded by 1 and the border overwritten with that bias, then a
    valid 3x3: dense (``kind="conv"``) or depthwise ``scale * mask``."""

    def __init__(self, kind: str, cin: int, cout: int, multiplier: float = 2.0) -> None:
        super().__init__()
        self.kind, self.cout = kind, cout
        mid = int(cout * multiplier) if kind == "conv" else cout
        first = nn.Conv2d(cin, mid, 1)
        self.k0, self.b0 = first.weight, first.bias
        if kind == "conv":
            second = nn.Conv2d(mid, cout, 3)
            self.k1, self.b1 = second.weight, second.bias
        else:
            self.scale = nn.Parameter(torch.randn(cout, 1, 1, 1) * 1e-3)
            self.bias = nn.Parameter(torch.randn(cout) * 1e-3)
            self.mask = nn.Parameter(torch.tensor(_MASKS[kind]).repeat(cout, 1, 1, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = F.conv2d(x, self.k0, self.b0, stride=1)
        y0 = F.pad(y0, (1, 1, 1, 1), "constant", 0)
        b = self.b0.view(1, -1, 1, 1)
        y0[:, :, 0:1, :] = b
        y0[:, :, -1:, :] = b
        y0[:, :, :, 0:1] = b
        y0[:, :, :, -1:] = b
        if self.kind == "conv":
            return F.conv2d(y0, self.k1, self.b1, stride=1)
        return F.conv2d(y0, self.scale * self.mask, self.bias, stride=1, groups=self.cout)


class ECBStyle(nn.Module):
    """Edge-oriented block: 3x3 + 1x1-3x3 + Sobel-x + Sobel-y + Laplacian (+ x), then PReLU."""

    def __init__(self, cin: int, cout: int, with_idt: bool = True) -> None:
        super().__init__()
        self.with_idt = with_idt and cin == cout
        self.conv3x3 = nn.Conv2d(cin, cout, 3, padding=1)
        self.seq = SeqBiasPad("conv", cin, cout)
        self.sbx = SeqBiasPad("sobelx", cin, cout)
        self.sby = SeqBiasPad("sobely", cin, cout)
        self.lpl = SeqBiasPad("laplacian", cin, cout)
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3x3(x) + self.seq(x) + self.sbx(x) + self.sby(x) + self.lpl(x)
        if self.with_idt:
            y += x
        return self.act(y)


def _frequency_prior(channels: int, k: int) -> torch.Tensor:
    half = channels / 2
    prior = torch.empty(channels, k, k)
    for i in range(channels):
        for h in range(k):
            for w in range(k):
                arg = (h + 0.5) * (i + 1) if i < half else (w + 0.5) * (i + 1 - half)
                prior[i, h, w] = math.cos(math.pi * arg / k)
    return prior


class OREPAStyle(nn.Module):
    """Online re-parametrization: the kernel is generated from six branch parameters in every
    forward (shapes read by tuple unpacking and ``int()``), then one conv and BN."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, expand: int = 4) -> None:
        super().__init__()
        self.cin, self.k, self.stride, self.groups = cin, k, stride, groups
        ig = cin // groups
        self.w_origin = nn.Parameter(torch.randn(cout, ig, k, k) * 0.2)
        self.w_avg_conv = nn.Parameter(torch.randn(cout, ig, 1, 1) * 0.2)
        self.register_buffer("w_avg_avg", torch.full((k, k), 1.0 / (k * k)))
        self.w_prior_conv = nn.Parameter(torch.randn(cout, ig, 1, 1) * 0.2)
        self.register_buffer("w_prior", _frequency_prior(cout, k))
        self.w_idconv1 = nn.Parameter(torch.zeros(cin, ig, 1, 1))
        ident = torch.zeros(cin, ig, 1, 1)
        for i in range(cin):
            ident[i, i % ig, 0, 0] = 1.0
        self.register_buffer("id_tensor", ident)
        self.w_conv2 = nn.Parameter(torch.randn(cout, ig, k, k) * 0.2)
        self.w_1x1 = nn.Parameter(torch.randn(cout, ig, 1, 1) * 0.2)
        self.w_dw = nn.Parameter(torch.randn(cin * expand, 1, k, k) * 0.2)
        self.w_pw = nn.Parameter(torch.randn(cout, cin * expand // groups, 1, 1) * 0.2)
        self.vector = nn.Parameter(torch.tensor([0.25, 0.25, 0.1, 0.5, 1.0, 0.5]).reshape(-1, 1).repeat(1, cout))
        self.bn = nn.BatchNorm2d(cout)

    def weight_gen(self) -> torch.Tensor:
        o, ig, h, w = self.w_origin.size()
        g = self.groups
        origin = torch.einsum("oihw,o->oihw", self.w_origin, self.vector[0])
        avg = torch.einsum("oi,hw->oihw", self.w_avg_conv.squeeze(3).squeeze(2), self.w_avg_avg)
        avg = torch.einsum("oihw,o->oihw", avg, self.vector[1])
        prior = torch.einsum("oi,ohw->oihw", self.w_prior_conv.squeeze(3).squeeze(2), self.w_prior)
        prior = torch.einsum("oihw,o->oihw", prior, self.vector[2])
        conv1 = (self.w_idconv1 + self.id_tensor).squeeze(3).squeeze(2)  # [T, ig]
        t = conv1.size(0)
        seq = torch.einsum("gti,gothw->goihw", conv1.view(g, int(t / g), ig),
                           self.w_conv2.view(g, int(o / g), int(t / g), h, w)).reshape(o, ig, h, w)
        seq = torch.einsum("oihw,o->oihw", seq, self.vector[3])
        pad = (self.k - 1) // 2
        one = torch.einsum("oihw,o->oihw", F.pad(self.w_1x1, [pad, pad, pad, pad]), self.vector[4])
        dw = self.w_dw.view(g, int(self.cin / g), -1, 1, h, w)  # per input channel: `expand` taps
        pw = self.w_pw.view(g, int(o / g), int(self.cin / g), -1)
        dwsc = torch.einsum("gieohw,gjie->gjiohw", dw, pw).reshape(o, ig, h, w)
        dwsc = torch.einsum("oihw,o->oihw", dwsc, self.vector[5])
        return origin + avg + prior + seq + one + dwsc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight_gen(), None, self.stride, self.k // 2, 1, self.groups)
        return self.bn(out)


class DeviceBranchRepVGG(nn.Module):
    """RepVGG block that branches on ``x.get_device()`` (channels_last on GPU)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dense = conv_bn(channels, channels, 3, 1, 1)
        self.one = conv_bn(channels, channels, 1)
        self.identity = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.get_device() >= 0:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.act(self.dense(x) + self.one(x) + self.identity(x))


class IntShapeRepVGG(DeviceBranchRepVGG):
    """RepVGG block that computes ``int()`` of its input's shape (the size is baked into the capture)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = (int(s) for s in x.shape)
        y = self.dense(x) + self.one(x) + self.identity(x)
        return self.act(y.reshape(n, c, h, w))


class OnlineMergeSeq(SeqBiasPad):
    """ECBSR's habit: train with the branches (here the mask branch plus an identity), evaluate with
    the merged kernel built in ``forward`` by slice assignment into zeros tensors (the depthwise mask
    made dense channel by channel, the identity tap by tap, on the device ``get_device()`` names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x) + x
        tmp = self.scale * self.mask
        device = tmp.get_device()
        device = None if device < 0 else device
        dense = torch.zeros(self.cout, self.cout, 3, 3, dtype=tmp.dtype, device=device)
        ident = torch.zeros(self.cout, self.cout, 3, 3, dtype=tmp.dtype, device=device)
        for i in range(self.cout):
            dense[i, i, :, :] = tmp[i, 0, :, :]
            ident[i, i, 1, 1] = 1.0
        weight = torch.einsum("edhw,dc->echw", dense, self.k0[:, :, 0, 0]) + ident
        bias = torch.einsum("edhw,d->e", dense, self.b0) + self.bias
        return F.conv2d(x, weight, bias, padding=1)


class Net(nn.Module):
    """A stem, two DBB-style blocks (the second strided) and a head: blocks inside a network."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = DBBStyle(3, 8, 3)
        self.act = nn.ReLU()
        self.block = DBBStyle(8, 8, 3, stride=2, internal=16)
        self.ecb = ECBStyle(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ecb(self.act(self.block(self.act(self.stem(x)))))
        return self.head(y.mean((2, 3)))


def _case(make: Callable[[], nn.Module], channels: int, id: str):
    return pytest.param(make, channels, id=id)


STYLE_CASES = [
    _case(lambda: DBBStyle(8, 16, 3), 8, "dbb-slice-k3"),
    _case(lambda: DBBStyle(8, 8, 3, stride=2, groups=2), 8, "dbb-slice-k3-s2-g2"),
    _case(lambda: DBBStyle(8, 16, 5, internal=12), 8, "dbb-slice-k5-plain1x1"),
    _case(lambda: DBBStyle(8, 8, 3, groups=8), 8, "dbb-slice-dw"),
    _case(lambda: DBBStyle(8, 16, 3, pad_layer=FullBNPad), 8, "dbb-full-copy"),
    _case(lambda: DBBStyle(8, 16, 5, stride=2, pad_layer=FullBNPad), 8, "dbb-full-copy-k5-s2"),
    _case(lambda: DBBStyle(8, 16, 3, pad_layer=ZerosSelectBNPad), 8, "dbb-zeros-select"),
    _case(lambda: SeqBiasPad("conv", 8, 16), 8, "ecb-seq-conv"),
    _case(lambda: SeqBiasPad("laplacian", 8, 8), 8, "ecb-seq-laplacian"),
    _case(lambda: ECBStyle(8, 8), 8, "ecb"),
    _case(lambda: ECBStyle(8, 16), 8, "ecb-noid"),
    _case(lambda: OREPAStyle(8, 16, 3), 8, "orepa"),
    _case(lambda: OREPAStyle(8, 8, 3, stride=2, groups=2), 8, "orepa-s2-g2"),
    _case(lambda: DeviceBranchRepVGG(8), 8, "repvgg-get-device"),
]


# ---------------------------------------------------------------------------
# Reference merges from the algebra.
# ---------------------------------------------------------------------------

def _fold(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """R1: BN(conv(x; W, b)) with running statistics."""
    t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = -bn.running_mean if bias is None else bias - bn.running_mean
    return weight * t.reshape(-1, 1, 1, 1), bn.bias + b * t


def _dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """R5: grouped [O, I/g, kh, kw] -> dense [O, I, kh, kw]."""
    o, ig, kh, kw = weight.shape
    out = weight.new_zeros(o, ig * groups, kh, kw)
    for j in range(o):
        g = j // (o // groups)
        out[j, g * ig:(g + 1) * ig] = weight[j]
    return out


def _centre(weight: torch.Tensor, k: int) -> torch.Tensor:
    """R4: zero-pad a small kernel to k x k around the centre."""
    p = (k - weight.shape[-1]) // 2
    return F.pad(weight, [p, p, p, p])


def _seq(first_w: torch.Tensor, first_b: torch.Tensor, second_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R6 on dense kernels: 1x1 (W1, b1) padded with b1, then a valid kxk W2 -> one kxk."""
    w = torch.einsum("edhw,dc->echw", second_w, first_w[:, :, 0, 0])
    b = torch.einsum("edhw,d->e", second_w, first_b)
    return w, b


def _reference_dbb(block: DBBStyle) -> tuple[torch.Tensor, torch.Tensor]:
    g, k = block.groups, block.k
    w, b = _fold(block.origin[0].weight, None, block.origin[1])
    weight, bias = _dense(w, g), b
    w, b = _fold(block.one[0].weight, None, block.one[1])
    weight, bias = weight + _centre(_dense(w, g), k), bias + b
    cout = weight.shape[0]
    avg = weight.new_zeros(cout, cout, k, k)
    for o in range(cout):
        avg[o, o] = 1.0 / (k * k)
    w1, b1 = _fold(_dense(block.avg_conv.weight, g), None, block.avg_pad.bn)
    w, b = _seq(w1, b1, avg)
    w, b = _fold(w, b, block.avg_bn)
    weight, bias = weight + w, bias + b
    conv1 = block.seq_conv1
    first = conv1.weight + conv1.ident.to(conv1.weight) if isinstance(conv1, IdentityInit1x1) else conv1.weight
    w1, b1 = _fold(_dense(first, g), None, block.seq_pad.bn)
    w, b = _seq(w1, b1, _dense(block.seq_conv2.weight, g))
    w, b = _fold(w, b, block.seq_bn)
    return weight + w, bias + b


def _reference_seq(branch: SeqBiasPad) -> tuple[torch.Tensor, torch.Tensor]:
    if branch.kind == "conv":
        second_w, second_b = branch.k1, branch.b1
    else:
        second_w, second_b = _dense(branch.scale * branch.mask, branch.cout), branch.bias
    w, b = _seq(branch.k0, branch.b0, second_w)
    return w, b + second_b


def _reference_ecb(block: ECBStyle) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = block.conv3x3.weight, block.conv3x3.bias
    for branch in (block.seq, block.sbx, block.sby, block.lpl):
        w, b = _reference_seq(branch)
        weight, bias = weight + w, bias + b
    if block.with_idt:
        eye = torch.zeros_like(weight)
        for c in range(weight.shape[0]):
            eye[c, c, 1, 1] = 1.0
        weight = weight + eye
    return weight, bias


def _merged_conv(merged: fx.GraphModule) -> nn.Conv2d:
    convs = [m for m in merged.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1, merged.code
    return convs[0]


# ---------------------------------------------------------------------------
# 1. The blocks are out of FX's reach, and merge exactly through export.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, channels", STYLE_CASES)
def test_fx_cannot_trace_these_blocks(make: Callable[[], nn.Module], channels: int) -> None:
    assert _fx_fails(make())


@pytest.mark.parametrize("make, channels", STYLE_CASES)
def test_merge_through_export_is_exact(make: Callable[[], nn.Module], channels: int) -> None:
    block = _calibrated(make(), channels)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    merged = repq_fx.merge(block, (_input(channels),))  # capture="auto": FX fails, export is used
    # A lone 1x1 -> depthwise 3x3 stays two convs: one dense 3x3 would cost more (the cost rule);
    # the 1x1 with its bias-valued padding still becomes one conv (a zero-padded 1x1 with that bias).
    expected = 2 if isinstance(block, SeqBiasPad) and block.kind != "conv" else 1
    assert _convs(merged) == expected and _bns(merged) == 0, merged.code
    with torch.no_grad():
        for spatial in (SPATIAL, (8, 8), (16, 9)):  # batch and spatial sizes stay symbolic
            for batch in (1, 3):
                x = _input(channels, batch=batch, spatial=spatial, seed=7)
                assert _rel_err(merged(x), block(x)) <= REL_TOL, (spatial, batch)
    assert all(torch.equal(block.state_dict()[k], v) for k, v in before.items()), "merge mutated its input"
    assert not block.training


@pytest.mark.parametrize("make, channels", [c for c in STYLE_CASES if c.id.startswith("dbb-slice")][:2]
                         + [c for c in STYLE_CASES if c.id == "ecb"])
def test_explicit_export_and_example_inputs(make: Callable[[], nn.Module], channels: int) -> None:
    block = _calibrated(make(), channels)
    x = _input(channels, seed=3)
    merged = repq_fx.merge(block, (x,), capture="export")
    with torch.no_grad():
        assert _rel_err(merged(x), block(x)) <= REL_TOL
    assert _convs(merged) == 1


@pytest.mark.parametrize("make", [lambda: DBBStyle(8, 16, 3), lambda: DBBStyle(8, 8, 5, stride=2, groups=4),
                                  lambda: DBBStyle(8, 16, 3, pad_layer=FullBNPad)],
                         ids=["k3", "k5-s2-g4", "full-copy"])
def test_dbb_kernel_equals_reference(make: Callable[[], nn.Module]) -> None:
    block = _calibrated(make(), 8)
    conv = _merged_conv(repq_fx.merge(block))
    weight, bias = _reference_dbb(block)
    with torch.no_grad():
        assert _rel_err(_dense(conv.weight, conv.groups), weight) <= REL_TOL
        assert _rel_err(conv.bias, bias) <= REL_TOL
    assert conv.padding == (block.k // 2,) * 2 and conv.stride == (block.stride,) * 2


@pytest.mark.parametrize("with_idt", [True, False])
def test_ecb_kernel_equals_reference(with_idt: bool) -> None:
    block = _calibrated(ECBStyle(8, 8, with_idt=with_idt), 8)
    merged = repq_fx.merge(block)
    conv = _merged_conv(merged)
    weight, bias = _reference_ecb(block)
    with torch.no_grad():
        assert _rel_err(conv.weight, weight) <= REL_TOL
        assert _rel_err(conv.bias, bias) <= REL_TOL
    assert conv.padding == (1, 1)
    assert any(type(m) is nn.PReLU for m in merged.modules())  # aten.prelu on its weight: the module again


def test_network_of_blocks() -> None:
    model = _calibrated(Net(), 3)
    x = _input(3, seed=5)
    report = repq_fx.explain(model)
    assert report.front_end == "export"
    assert len(report.merged) == 3 and not report.not_merged, str(report)
    merged = repq_fx.merge(model)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
        assert _rel_err(merged(_input(3, batch=5, spatial=(20, 17))), model(_input(3, batch=5, spatial=(20, 17)))) <= REL_TOL
    assert _convs(merged) == 3


# ---------------------------------------------------------------------------
# 2. Front end selection.
# ---------------------------------------------------------------------------

def test_explain_says_which_front_end() -> None:
    block = _calibrated(DBBStyle(8, 16, 3), 8)
    report = repq_fx.explain(block)  # no example_inputs: made up, its channels found by running the model
    assert report.front_end == "export"
    text = str(report)
    assert "torch.export" in text and "symbolic tracing failed" in text, text
    assert len(report.merged) == 1 and report.merged[0].num_convs == 5, text

    traceable = _calibrated(B.RepVGGBlock(8, 8), 8)
    assert repq_fx.explain(traceable).front_end == "fx"
    assert repq_fx.explain(traceable, capture="export").front_end == "export"


def test_capture_fx_refuses_what_fx_cannot_trace() -> None:
    with pytest.raises(repq_fx.CaptureError, match="torch.fx could not trace"):
        repq_fx.merge(_calibrated(DBBStyle(8, 16, 3), 8), capture="fx")


@pytest.mark.parametrize("entry", [repq_fx.merge, repq_fx.explain, repq_fx.prepare])
@pytest.mark.parametrize("value", ["dynamo", "", None, 1])
def test_bad_capture_value_raises_config_error(entry, value) -> None:
    with pytest.raises(repq_fx.ConfigError, match="capture"):
        entry(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), capture=value)


def test_auto_does_not_bake_python_arguments() -> None:
    # forward(x, double=True) cannot be traced by FX; export would silently bake `double`:
    # "auto" refuses with FX's message, "export" bakes the default on request.
    class Flag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor, double: bool = True) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y * 2 if double else y

    model = _calibrated(Flag(), 3)
    with pytest.raises(repq_fx.CaptureError, match="concrete_args"):
        repq_fx.merge(model)
    merged = repq_fx.merge(model, capture="export")
    x = _input(3)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL


EXAMPLE_CASES = [
    _case(lambda: B.RepVGGBlock(8, 8, 3), 8, "repvgg"),
    _case(lambda: B.DiverseBranchBlock(8, 16, 3), 8, "dbb"),
    _case(lambda: B.DiverseBranchBlock(8, 8, 3, stride=2, groups=2), 8, "dbb-s2-g2"),
    _case(lambda: B.ACBlock(8, 8, 3, padding=0), 8, "acb-crop"),
    _case(lambda: B.OREPABlock(8, 16, 3), 8, "orepa"),
    _case(lambda: B.ECB(8, 8, with_idt=True), 8, "ecb"),
    _case(lambda: B.QARepVGGBlockV2(8, 8, 3), 8, "qarep2"),
]


@pytest.mark.parametrize("make, channels", EXAMPLE_CASES)
def test_export_agrees_with_fx_on_traceable_blocks(make: Callable[[], nn.Module], channels: int) -> None:
    block = _calibrated(make(), channels)
    x = _input(channels, seed=4)
    via_fx = repq_fx.merge(block)
    via_export = repq_fx.merge(block, capture="export")
    with torch.no_grad():
        assert _rel_err(via_export(x), block(x)) <= REL_TOL
        assert _rel_err(via_export(x), via_fx(x)) <= REL_TOL
    assert _convs(via_export) == _convs(via_fx) == 1
    q_fx = repq_fx.prepare(block)
    q_export = repq_fx.prepare(block, capture="export")
    assert set(q_export.state_dict()) == set(q_fx.state_dict())
    assert set(block.state_dict()) <= set(q_export.state_dict())


# ---------------------------------------------------------------------------
# 3. What the captured graph is: original names, mode-following BN, train-mode faithful.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, channels", [c for c in STYLE_CASES if c.id in ("dbb-slice-k3", "dbb-full-copy", "ecb",
                                                                             "orepa", "dbb-zeros-select")])
def test_captured_graph_follows_train_and_eval(make: Callable[[], nn.Module], channels: int) -> None:
    block = _calibrated(make(), channels)
    gm = capture(block, front_end="export")
    assert gm.meta["repq_front_end"] == "export"
    code = gm.code
    assert "torch.ops.aten.slice_scatter" not in code and "batch_norm.default" not in code, code
    names = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    params = dict(block.named_parameters()) | dict(block.named_buffers())
    saved = gm.state_dict()
    for name in names:  # the model's own names; constants are non-persistent buffers (not saved)
        owner, _, field = name.rpartition(".")
        obj = getattr(gm.get_submodule(owner), field)
        if isinstance(obj, nn.Module):
            assert isinstance(obj, nn.BatchNorm2d), name
        else:
            assert name in params or name not in saved, name
    assert set(saved) <= set(block.state_dict())
    x = _input(channels, seed=9)
    original = copy.deepcopy(block)
    with torch.no_grad():
        assert _rel_err(gm.eval()(x), original.eval()(x)) <= REL_TOL
        gm.train(), original.train()
        for seed in (10, 11):  # train mode: batch statistics, running statistics updated in place
            x = _input(channels, seed=seed)
            assert _rel_err(gm(x), original(x)) <= REL_TOL
        state = original.state_dict()
        for k, v in gm.state_dict().items():
            if k in state:
                assert torch.allclose(v, state[k], rtol=1e-12, atol=1e-12), k


def test_train_and_eval_forwards_that_differ() -> None:
    # merge captures the eval forward (the kernel is built online by slice assignment: a parameter
    # expression, one conv); prepare captures the train forward (slice-assigned bias padding) and
    # checks it against the eval forward before accepting it.
    block = _calibrated(OnlineMergeSeq("sobelx", 8, 8), 8)
    x = _input(8, seed=14)
    merged = repq_fx.merge(block)
    with torch.no_grad():
        assert _rel_err(merged(x), block.eval()(x)) <= REL_TOL
    qmodel = repq_fx.prepare(block)
    repq_fx.disable_fake_quant(qmodel)
    with torch.no_grad():
        assert _rel_err(qmodel.eval()(x), block.eval()(x)) <= REL_TOL
        assert _rel_err(qmodel.train()(x), copy.deepcopy(block).train()(x)) <= REL_TOL


# ---------------------------------------------------------------------------
# 4. prepare through export.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, channels, train_exact", [
    pytest.param(lambda: DBBStyle(8, 16, 3), 8, False, id="dbb"),
    pytest.param(lambda: ECBStyle(8, 8), 8, True, id="ecb"),
    pytest.param(lambda: OREPAStyle(8, 16, 3), 8, True, id="orepa"),
    pytest.param(lambda: DeviceBranchRepVGG(8), 8, True, id="repvgg-get-device"),
])
def test_prepare_through_export(make: Callable[[], nn.Module], channels: int, train_exact: bool) -> None:
    block = _calibrated(make(), channels)
    qmodel = repq_fx.prepare(block)
    repq_fx.disable_fake_quant(qmodel)
    assert set(block.state_dict()) <= set(qmodel.state_dict())
    qmodel.load_state_dict(block.state_dict(), strict=False)
    x = _input(channels, seed=12)
    with torch.no_grad():
        assert _rel_err(qmodel.eval()(x), block.eval()(x)) <= REL_TOL
    original = copy.deepcopy(block).train()
    qmodel.train()
    y = qmodel(x)
    with torch.no_grad():
        expected = original(x)
    if train_exact:  # DBB pads with running-statistics values while its BN uses batch statistics (R6)
        assert _rel_err(y, expected) <= REL_TOL
    y.square().mean().backward()
    params = dict(qmodel.named_parameters())
    trained = [n for n, p in block.named_parameters() if p.requires_grad]
    missing = [n for n in trained if n in params and params[n].grad is None]
    assert trained and not missing, missing
    repq_fx.enable_fake_quant(qmodel)
    repq_fx.calibrate(qmodel, [_input(channels, seed=13)])
    assert qmodel(x).shape == expected.shape


def test_export_captured_network_deploys_to_onnx(tmp_path) -> None:
    # The canonical forms (PReLU module, x.mean, F.* activations) are what lower/export_onnx know.
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = _calibrated(Net(), 3).float()
    x = torch.randn(2, 3, 16, 16)
    qmodel = repq_fx.prepare(model, example_inputs=(x,))
    repq_fx.calibrate(qmodel, [torch.randn(2, 3, 16, 16) for _ in range(2)])
    deploy = repq_fx.lower(qmodel)
    path = str(tmp_path / "net.onnx")
    repq_fx.export_onnx(deploy, (x,), path)
    from repq_fx.export.parity import check_onnx_runtime

    parity = check_onnx_runtime(path, deploy, (x,))  # every layer within one step, on any CPU
    assert parity.values == deploy(x).numel() and parity.ops["QLinearConv"] >= 1


def test_export_captured_models_pickle(tmp_path) -> None:
    # torch.load re-traces a GraphModule's code: repq_fx's own functions (batch_norm, size arithmetic,
    # the size guard) must stay calls, and export's own tracer must not be needed.
    model = _calibrated(IntShapeRepVGG(8), 8)
    x = _input(8, batch=3)
    for entry in (repq_fx.merge, repq_fx.prepare):
        out = entry(model, example_inputs=(x,)).eval()
        torch.save(out, tmp_path / "m.pt")
        back = torch.load(tmp_path / "m.pt", weights_only=False)
        with torch.no_grad():
            assert torch.equal(back(x), out(x))
            with pytest.raises(repq_fx.RepQError):
                back(_input(8, batch=3, spatial=(9, 9)))
    block = _calibrated(DBBStyle(8, 16, 3, pad_layer=ZerosSelectBNPad), 8)
    qmodel = repq_fx.prepare(block)
    torch.save(qmodel, tmp_path / "q.pt")
    back = torch.load(tmp_path / "q.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), qmodel.eval()(x))


# ---------------------------------------------------------------------------
# 5. What cannot be mapped.
# ---------------------------------------------------------------------------

class NotAPad(nn.Module):
    """1x1 (bias) -> zero pad -> border written with the bias on three sides and zero on the fourth
    -> valid 3x3: not a padding with one value, so not one conv (it must stay as it is)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(4, 6, 1)
        self.second = nn.Conv2d(6, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(self.first(x), (1, 1, 1, 1))
        b = self.first.bias.view(1, -1, 1, 1)
        y[:, :, 0:1, :] = b
        y[:, :, -1:, :] = b
        y[:, :, :, 0:1] = b
        return self.second(y)


def test_slice_assignment_that_is_not_a_pad_stays() -> None:
    model = _calibrated(NotAPad(), 4)
    merged = repq_fx.merge(model)
    x = _input(4)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
    assert _convs(merged) == 2, merged.code
    report = repq_fx.explain(model)
    assert not report.merged or all(b.num_convs == 1 for b in report.blocks), str(report)


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x)


class ScaledBN(nn.Module):
    """F.batch_norm on a computed weight, with the training flag written by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        return F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight * 2, bn.bias, True)


class HandDropPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = DBBStyle(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if self.training:
            keep = torch.empty(y.shape[0], 1, 1, 1, dtype=y.dtype).bernoulli_(0.8)
            y = y * keep / 0.8
        return x + y


def test_buffer_mutation_is_refused_with_the_op_named() -> None:
    with pytest.raises(repq_fx.UnsupportedOpError) as info:
        repq_fx.merge(Counter(), capture="export")
    message = str(info.value)
    assert "calls" in message and "aten.add" in message


def test_batch_norm_on_computed_weight_is_refused() -> None:
    with pytest.raises(repq_fx.UnsupportedOpError) as info:
        repq_fx.prepare(ScaledBN(), capture="export")
    message = str(info.value)
    assert "batch_norm" in message and "bn" in message


def test_random_op_baked_in_train_mode() -> None:
    model = _calibrated(HandDropPath(), 4)
    merged = repq_fx.merge(model)  # eval capture: the random branch is not taken
    x = _input(4)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
    assert _convs(merged) == 1
    with pytest.raises(repq_fx.UnsupportedOpError) as info:
        repq_fx.prepare(model)  # train capture: bernoulli would stay on in eval mode
    message = str(info.value)
    assert "bernoulli" in message and "train" in message


def test_int_on_shapes_bakes_the_size_and_is_guarded() -> None:
    model = _calibrated(IntShapeRepVGG(8), 8)
    assert _fx_fails(model)
    x = _input(8, batch=3, seed=2)
    merged = repq_fx.merge(model, (x,))
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
        with pytest.raises(repq_fx.RepQError, match="int\\(\\)|specialized|size"):
            merged(_input(8, batch=3, spatial=(9, 9)))
    assert _convs(merged) == 1


def test_export_failure_is_a_capture_error_with_both_reasons() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                x = -x
            return self.conv(x)

    with pytest.raises(repq_fx.CaptureError) as info:
        repq_fx.merge(DataDependent())
    message = str(info.value)
    assert "torch.fx could not trace" in message and "torch.export" in message
    with pytest.raises(repq_fx.CaptureError, match="torch.export"):
        repq_fx.merge(DataDependent(), capture="export")


# ---------------------------------------------------------------------------
# The made-up example input.
# ---------------------------------------------------------------------------

class OREPAStyleBuilder(ConvBuilder):
    """ResNet-18 units as :class:`OREPAStyle` (kernels generated from parameters, no ``nn.Conv2d``), as
    the OREPA repository builds its ResNets; only the projection shortcuts are ``nn.Conv2d`` modules."""

    def conv_bn(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                padding: int = 0) -> nn.Module:
        return OREPAStyle(in_channels, out_channels, kernel_size, stride)


def test_made_up_input_of_a_grouped_block_has_its_input_channels() -> None:
    """Regression: without example_inputs, the export front end took the channel count from the first
    conv-like parameter in registration order, OREPA's ``[O, I/groups, k, k]`` kernel: 4 channels for a
    16-channel block with groups=4, and the capture failed."""
    block = _calibrated(OREPAStyle(16, 16, 3, groups=4), 16)
    x = _input(16)
    for capture_mode in ("export", "auto"):
        merged = repq_fx.merge(block, capture=capture_mode)
        with torch.no_grad():
            assert _rel_err(merged(x), block(x)) <= REL_TOL
    assert len(repq_fx.explain(block, capture="export").merged) == 1
    qmodel = repq_fx.prepare(block, capture="export")
    repq_fx.disable_fake_quant(qmodel)
    with torch.no_grad():
        assert _rel_err(qmodel.eval()(x), block(x)) <= REL_TOL


def test_made_up_input_of_a_network_has_its_stems_channels() -> None:
    """Regression: a ResNet of OREPA-style units on 3-channel images, whose first ``nn.Conv2d`` in
    registration order is a 16-channel projection shortcut: the made-up input had 16 channels."""
    model = _calibrated(ResNet18(OREPAStyleBuilder(), in_channels=3, num_blocks=(1, 1, 1, 1)), 3)
    assert next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels == 16
    merged = repq_fx.merge(model, capture="export")
    x = _input(3)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
    report = repq_fx.explain(model, capture="export")
    assert len(report.merged) == 1 + 4 * 2 + 3, str(report)  # stem, 4 blocks of two units, 3 projections


class FlatInput(nn.Module):
    """Takes flat vectors and reshapes them into 3x4x4 images: no image input can be guessed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x.view(x.shape[0], 3, 4, 4)))


def test_an_input_that_cannot_be_made_up_asks_for_example_inputs() -> None:
    """Regression: the error named ``concrete_args`` (not a parameter of the public API) and said
    nothing of the made-up input; it must say to pass ``example_inputs``."""
    model = FlatInput().double().eval()
    for entry in (repq_fx.merge, repq_fx.explain, repq_fx.prepare):
        with pytest.raises(repq_fx.CaptureError, match="example_inputs") as info:
            entry(model, capture="export")
        assert "concrete_args" not in str(info.value)
    merged = repq_fx.merge(model, example_inputs=(torch.randn(2, 48, dtype=torch.float64),), capture="export")
    x = torch.randn(5, 48, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL


def test_fx_failure_message_points_at_public_parameters() -> None:
    """Regression: the FX failure (also shown when the export fallback fails) told the user to "pass
    concrete_args", which no repq_fx function takes; it names capture='export' with example_inputs, and
    concrete_args only as torch.fx.symbolic_trace's own parameter."""
    block = _calibrated(OREPAStyle(8, 8, 3), 8)
    with pytest.raises(repq_fx.CaptureError, match="example_inputs") as info:
        repq_fx.merge(block, capture="fx")
    message = str(info.value)
    assert "capture='export'" in message
    assert message.count("concrete_args") == message.count("torch.fx.symbolic_trace(model, concrete_args=")


# ---------------------------------------------------------------------------
# In-place ops without a second trace (export speed).
# ---------------------------------------------------------------------------

class InPlaceUnits(nn.Module):
    """In-place ops the export front end rewrites itself: ReLU(inplace), ``+=`` on a fresh sum,
    BatchNorm batch counters (train mode), in-place dropout, and the head's flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.0, inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + self.b(x)
        y += x
        y = self.drop(self.act(y))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class WriteIntoView(nn.Module):
    """A slice assignment (a write into a view): needs functionalization by the second trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y[:, :2] = y[:, :2] * 2
        return y


def _structure(gm: fx.GraphModule) -> list[tuple[str, str]]:
    return [(n.op, n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
            for n in gm.graph.nodes]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("make, second_trace", [(InPlaceUnits, False), (WriteIntoView, True)],
                         ids=["in-place-units", "write-into-view"])
def test_in_place_ops_rewritten_without_a_second_trace(make, second_trace: bool, mode: str, monkeypatch) -> None:
    """The program is only traced a second time (``run_decompositions``) where the rewrite of its
    in-place ops does not suffice; the canonical graph is the one the second trace gives, and it
    computes the model."""
    from repq_fx.capture import export_frontend
    from repq_fx.capture.in_place import remove_in_place_ops

    model = _calibrated(make(), 4).train(mode == "train")
    x = _input(4)
    ep = torch.export.export(copy.deepcopy(model), (x,), strict=False)
    assert remove_in_place_ops(ep, model) is not second_trace
    light = capture(model, (x,), front_end="export", mode=mode)
    monkeypatch.setattr(export_frontend, "remove_in_place_ops", lambda ep, root: False)
    retraced = capture(model, (x,), front_end="export", mode=mode)
    assert _structure(light) == _structure(retraced)
    with torch.no_grad():
        assert _rel_err(light.eval()(x), model.eval()(x)) <= REL_TOL
