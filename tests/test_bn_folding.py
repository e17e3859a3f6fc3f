"""BatchNorms that fold.

(a) A BatchNorm after a channel concat of conv branches, where one merged conv would cost more
    than the branches (a 3x3 next to a 1x1: the 1x1 would become a 3x3): the BN is split by channel
    and each part folds into its branch's conv; the block becomes ``cat([conv_a(x), conv_b(x)])``.
(b) A BatchNorm2d after an ``nn.Linear`` on channels-last pixels moved back to channels-first
    (UniRepLKNet's ``pwconv2``: Linear -> permute(0, 3, 1, 2) -> BatchNorm2d, then a layer scale),
    which the authors' own ``reparameterize`` folds into the linear: the linear is the 1x1 conv it
    is, and the BN (and the scale) fold into it. BatchNorms after a linear in other layouts stay, and
    ``explain`` says so (not "between non-linear ops").

Every case: ``merge`` equals ``model.eval()`` (float64, relative error <= 1e-9) with no BatchNorm
left; ``prepare`` with fake quant off equals the model in train and in eval mode.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import repq_fx
from repq_fx.quant.lowered import QuantizedConv2d
from exactness import REL_TOL, rel_err as _rel_err

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_BN = nn.modules.batchnorm._BatchNorm


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """float64; random weights, biases, BN affine parameters and running statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in))
        for m in model.modules():
            if isinstance(m, _BN):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=torch.float64))
                m.weight.add_(1.0)
    return model.eval()


def _check_exact(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """merge == model.eval() with no BatchNorm left; prepare (fake quant off) == model, train and eval."""
    with torch.no_grad():
        expected = model.eval()(x)
        merged = repq_fx.merge(model)
        assert _rel_err(merged(x), expected) <= REL_TOL
    left = [n for n, m in merged.named_modules() if isinstance(m, _BN)]
    assert not left, f"BatchNorms left after merge: {left}\n{merged.code}"
    qmodel = repq_fx.prepare(model)
    repq_fx.disable_fake_quant(qmodel)
    with torch.no_grad():
        assert _rel_err(qmodel.eval()(x), expected) <= REL_TOL
        reference = copy.deepcopy(model).train()
        assert _rel_err(qmodel.train()(x), reference(x)) <= REL_TOL
        assert _rel_err(qmodel.eval()(x), reference.eval()(x)) <= REL_TOL  # same running-statistics update
    return merged


# ---------------------------------------------------------------------------
# (a) BatchNorm after a channel concat.
# ---------------------------------------------------------------------------

class ConcatBN(nn.Module):
    """``relu(bn(cat([conv3x3(x), conv1x1(x)])))``: Inception/GhostNet-style branches under one BN."""

    def __init__(self, cin: int = 8) -> None:
        super().__init__()
        self.a = nn.Conv2d(cin, 6, 3, padding=1)
        self.b = nn.Conv2d(cin, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_bn_after_a_costly_concat_is_split_into_the_branches() -> None:
    """Regression: one merged conv was refused for cost (the 1x1 would become a 3x3), the concat
    was left out, and the BN stayed a float BatchNorm after it (in merge and after lower)."""
    model = _randomize(ConcatBN(), seed=0)
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    merged = _check_exact(model, x)
    convs = [m for m in merged.modules() if isinstance(m, nn.Conv2d)]
    assert sorted(tuple(c.kernel_size) for c in convs) == [(1, 1), (3, 3)]  # no costlier merged conv
    report = repq_fx.explain(model)
    assert len(report.blocks) == 1 and report.blocks[0].merged, str(report)
    assert report.blocks[0].kernels == ((3, 3), (1, 1)), str(report)
    assert "one conv per concatenated branch" in report.blocks[0].reason
    assert "2 convs -> 2" in str(report)
    # QAT end to end: two integer convs, no float BN
    qmodel = repq_fx.prepare(model.float())
    repq_fx.calibrate(qmodel, [x.float()])
    lowered = repq_fx.lower(qmodel)
    assert sum(isinstance(m, QuantizedConv2d) for m in lowered.modules()) == 2
    assert not any(isinstance(m, _BN) for m in lowered.modules())
    with torch.no_grad():
        assert torch.equal(lowered(x.float()).argmax(1), qmodel.eval()(x.float()).argmax(1))


@dataclasses.dataclass(frozen=True)
class ConcatSpec:
    cin: int
    branches: tuple[tuple[int, int, bool, bool], ...]  # (out channels, odd kernel, conv bias, BN on the branch)
    stride: int
    scale: bool  # a learned per-channel scale after the BN
    relu: bool
    seed: int
    h: int
    w: int


class RandomConcat(nn.Module):
    def __init__(self, s: ConcatSpec) -> None:
        super().__init__()
        self.s = s
        self.convs = nn.ModuleList(nn.Conv2d(s.cin, o, k, s.stride, k // 2, bias=b) for o, k, b, _ in s.branches)
        self.bns = nn.ModuleList(nn.BatchNorm2d(o) if bn else nn.Identity() for o, _, _, bn in s.branches)
        width = sum(o for o, *_ in s.branches)
        self.bn = nn.BatchNorm2d(width)
        if s.scale:
            self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.cat([bn(conv(x)) for conv, bn in zip(self.convs, self.bns)], dim=1))
        if self.s.scale:
            y = self.gamma.view(1, -1, 1, 1) * y
        return F.relu(y) if self.s.relu else y


@st.composite
def concat_specs(draw) -> ConcatSpec:
    branches = tuple((draw(st.integers(1, 4)), draw(st.sampled_from([1, 3, 5])), draw(st.booleans()),
                      draw(st.booleans())) for _ in range(draw(st.integers(2, 3))))
    return ConcatSpec(draw(st.integers(1, 5)), branches, draw(st.sampled_from([1, 2])), draw(st.booleans()),
                      draw(st.booleans()), draw(st.integers(0, 2**31 - 1)), draw(st.integers(5, 11)),
                      draw(st.integers(5, 11)))


@SETTINGS
@given(spec=concat_specs())
def test_bn_after_any_concat_of_convs_folds(spec: ConcatSpec) -> None:
    model = _randomize(RandomConcat(spec), spec.seed)
    x = torch.randn(2, spec.cin, spec.h, spec.w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    merged = _check_exact(model, x)
    report = repq_fx.explain(model)
    assert len(report.blocks) == 1 and report.blocks[0].merged, str(report)
    convs = [m for m in merged.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) <= len(spec.branches)
    # never costlier than the branches: multiply-adds per output pixel
    assert sum(c.weight.numel() for c in convs) <= sum(o * spec.cin * k * k for o, k, _, _ in spec.branches)


# ---------------------------------------------------------------------------
# (b) BatchNorm after a linear on channels-last pixels.
# ---------------------------------------------------------------------------

class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on NHWC pixels (as UniRepLKNet uses it)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        return (self.gamma * norm / (norm.mean(dim=-1, keepdim=True) + 1e-6) + 1) * x + self.beta


class LargeKernelBlock(nn.Module):
    """A UniRepLKNet-style block: depthwise conv -> BN, then an MLP on channels-last pixels whose
    second linear is followed by permute(0, 3, 1, 2) -> BatchNorm2d -> layer scale -> residual."""

    def __init__(self, dim: int = 8, ffn: int = 4) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.fc1 = nn.Linear(dim, ffn * dim)
        self.grn = GlobalResponseNorm(ffn * dim)
        self.fc2 = nn.Linear(ffn * dim, dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.grn(F.gelu(self.fc1(y)))
        y = self.bn(self.fc2(y).permute(0, 3, 1, 2))
        return x + self.gamma.view(1, -1, 1, 1) * y


def test_bn_after_a_linear_through_a_permute_folds_into_it() -> None:
    """Regression: the BN after pwconv2 stayed a BatchNorm, and explain said it sat "between
    non-linear ops with no conv" although the linear before it is one."""
    model = _randomize(nn.Sequential(LargeKernelBlock(), LargeKernelBlock()), seed=3)
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    merged = _check_exact(model, x)
    # as the authors' reparameterize: the BN and the layer scale live in the linear, which stays a linear
    assert sum(isinstance(m, nn.Linear) for m in merged.modules()) == 4
    assert sum(isinstance(m, nn.Conv2d) for m in merged.modules()) == 2
    report = repq_fx.explain(model)
    text = str(report)
    assert "between non-linear ops" not in text, text
    folded = [b for b in report.blocks if b.branches == "linear -> bn -> scale"]
    assert len(folded) == 2 and all(b.merged and b.kernel == (1, 1) for b in folded), text
    # the folded linear trains as a quantized 1x1 conv and lowers to an integer conv
    qmodel = repq_fx.prepare(model.float())
    repq_fx.calibrate(qmodel, [x.float()])
    lowered = repq_fx.lower(qmodel)
    assert sum(isinstance(m, QuantizedConv2d) for m in lowered.modules()) == 4
    assert not any(isinstance(m, _BN) for m in lowered.modules())


@given(permute=st.sampled_from(["method", "list", "function", "negative", "movedim"]), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@SETTINGS
def test_every_spelling_of_the_move_to_channels_first(permute: str, bias: bool, seed: int) -> None:
    class LinearBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 3, bias=bias), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x.permute(0, 2, 3, 1))
            y = {"method": lambda: y.permute(0, 3, 1, 2), "list": lambda: y.permute([0, 3, 1, 2]),
                 "function": lambda: torch.permute(y, (0, 3, 1, 2)), "negative": lambda: y.permute(0, -1, 1, 2),
                 "movedim": lambda: y.movedim(-1, 1)}[permute]()
            return F.relu(self.bn(y))

    model = _randomize(LinearBN(), seed)
    _check_exact(model, torch.randn(2, 5, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))


def test_bn_after_a_linear_in_another_layout_is_explained() -> None:
    """A BatchNorm1d after a linear on tokens (LeViT-style ``bn(linear(x).flatten(0, 1))``) is not
    folded; explain says it reads a linear layer's output instead of blaming non-linear ops."""

    class TokenLinearBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = F.relu(self.conv(x)).flatten(2).transpose(1, 2)  # [N, HW, C]
            y = self.fc(tokens)
            return self.bn(y.flatten(0, 1)).reshape_as(y)

    model = _randomize(TokenLinearBN(), seed=4)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    text = str(repq_fx.explain(model))
    assert "1 BatchNorms read a linear layer's output" in text and "between non-linear ops" not in text, text
    with torch.no_grad():
        assert _rel_err(repq_fx.merge(model)(x), model(x)) <= REL_TOL
