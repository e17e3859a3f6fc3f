"""Ops whose arguments are computed at run time from the input's shape.

``F.avg_pool2d(x, kernel_size=x.size(3))`` (the squeeze-excitation of the official RepVGG and
MobileOne code), a pad to an even size, a crop back to the input's size, a scale by
``x.size(1) ** -0.5``: each is a different linear map for every input size, so no fixed conv
computes it. Such an op is a boundary between blocks with a reason ``explain`` shows; the blocks
around it still merge, and nothing crashes.

Properties (hypothesis): a random chain of re-parametrized conv stages with such ops in between
is, in float64, either handled exactly (``merge`` equals ``model.eval()``; ``prepare`` with fake
quant off equals the model in train and in eval mode) or refused with a ``RepQError``; never
another exception.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import repq_fx
from exactness import REL_TOL, rel_err as _rel_err

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """float64; random conv weights and biases, BN affine parameters and running statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
                               / math.sqrt(m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=torch.float64))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=torch.float64))
                m.bias.copy_(0.3 * torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return model.eval()


def _check_exact(model: nn.Module, x: torch.Tensor) -> None:
    """merge == model.eval(); prepare (fake quant off) == model in train and in eval mode (float64)."""
    with torch.no_grad():
        expected = model.eval()(x)
        assert _rel_err(repq_fx.merge(model)(x), expected) <= REL_TOL
    qmodel = repq_fx.prepare(model)
    repq_fx.disable_fake_quant(qmodel)
    with torch.no_grad():
        assert _rel_err(qmodel.eval()(x), expected) <= REL_TOL
        train_ref = copy.deepcopy(model).train()
        assert _rel_err(qmodel.train()(x), train_ref(x)) <= REL_TOL
        qmodel.eval()
        assert _rel_err(qmodel(x), train_ref.eval()(x)) <= REL_TOL  # after identical running-stat updates


# ---------------------------------------------------------------------------
# Squeeze-excitation as the official RepVGG / MobileOne code writes it.
# ---------------------------------------------------------------------------

class SqueezeExcite(nn.Module):
    """Global average pool by ``kernel_size=x.size(3)``, 1x1 down, ReLU, 1x1 up, sigmoid, gate."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.avg_pool2d(x, kernel_size=x.size(3))
        w = torch.sigmoid(self.up(F.relu(self.down(w))))
        return x * w.view(-1, self.channels, 1, 1)


class RepBlockSE(nn.Module):
    """conv3x3 -> BN + conv1x1 -> BN + BN (identity), then SE, then ReLU."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.bn_id = nn.BatchNorm2d(channels)
        self.se = SqueezeExcite(channels, channels // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bn_id(x)
        return F.relu(self.se(y))


def test_squeeze_excite_block_merges_around_the_run_time_pool() -> None:
    """Regression: the SE pool's kernel_size=x.size(3) reached the avg-pool rule as a graph node and
    explain, merge and prepare died with "TypeError: 'Node' object is not iterable"."""
    model = _randomize(nn.Sequential(RepBlockSE(8), RepBlockSE(8)), seed=0)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    report = repq_fx.explain(model)
    text = str(report)
    assert "kernel_size is computed at run time from the input's shape" in text, text
    assert "x.size(3)" in text or ".size(3)" in text, text
    # the three branches of each block still merge into one 3x3; the SE convs are 1x1 blocks of their own
    rep = [b for b in report.blocks if b.num_convs == 2]
    assert len(rep) == 2 and all(b.merged and b.kernel == (3, 3) for b in rep), text
    _check_exact(model, x)
    merged = repq_fx.merge(model)
    assert sum(isinstance(m, nn.Conv2d) for m in merged.modules()) == 6  # 2 x (merged 3x3 + SE down + SE up)


def test_conv_padding_read_from_its_own_weight_shape_is_a_constant() -> None:
    """``padding=self.weight.shape[-1] // 2`` is the structure of the model (a parameter's shape never
    changes), so the conv still merges with its BN."""

    class SameConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 4, 5, 5))
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(F.conv2d(x, self.weight, None, 1, self.weight.shape[-1] // 2))

    model = _randomize(SameConv(), seed=1)
    report = repq_fx.explain(model)
    assert len(report.blocks) == 1 and report.blocks[0].merged, str(report)
    _check_exact(model, torch.randn(2, 4, 7, 8, dtype=torch.float64))


def test_concat_of_a_chunked_tensor_is_not_a_crash() -> None:
    """``torch.cat(x.chunk(2, 1), 1)``: the sequence is a graph node, which canonicalization iterated."""

    class ChunkCat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return torch.cat(y.chunk(2, dim=1)[::-1], dim=1)

    model = _randomize(ChunkCat(), seed=2)
    assert repq_fx.explain(model).blocks[0].merged
    _check_exact(model, torch.randn(2, 4, 6, 6, dtype=torch.float64))


# ---------------------------------------------------------------------------
# Property: random stages with sizes of the input as op arguments.
# ---------------------------------------------------------------------------

SIZE_OPS = ("se_pool", "pool_shape", "pad_even", "crop_to_input", "scale_by_width", "divide_by_height",
            "view_roundtrip", "interpolate_back", "conv_padding", "pool_padding", "cat_dim", "add_size",
            "slice_channels")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    kind: str  # "rep" (conv3x3 -> BN + conv1x1 -> BN [+ BN]) or one of SIZE_OPS
    identity: bool = False  # rep: a BN-only identity branch
    shape_attr: bool = False  # read sizes as x.shape[k] instead of x.size(k)


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    channels: int
    stages: tuple[StageSpec, ...]
    h: int
    w: int
    seed: int


class Stage(nn.Module):
    def __init__(self, spec: StageSpec, c: int) -> None:
        super().__init__()
        self.spec, self.c = spec, c
        if spec.kind == "rep":
            self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
            if spec.identity:
                self.bn_id = nn.BatchNorm2d(c)
        elif spec.kind in ("se_pool", "pool_shape"):
            self.se = nn.Conv2d(c, c, 1)
        elif spec.kind in ("crop_to_input", "interpolate_back"):
            self.conv = nn.Conv2d(c, c, 3, stride=2 if spec.kind == "interpolate_back" else 1,
                                  padding=1 if spec.kind == "interpolate_back" else 2)
            self.bn = nn.BatchNorm2d(c)
        elif spec.kind == "conv_padding":
            self.weight = nn.Parameter(torch.randn(c, c, 3, 3))
            self.bn = nn.BatchNorm2d(c)
        elif spec.kind in ("cat_dim", "slice_channels"):
            self.conv_a, self.conv_b = nn.Conv2d(c, c // 2, 3, padding=1), nn.Conv2d(c, c - c // 2, 1)

    def size(self, x: torch.Tensor, dim: int):
        return x.shape[dim] if self.spec.shape_attr else x.size(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.spec.kind
        if k == "rep":
            y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
            return y + self.bn_id(x) if self.spec.identity else y
        if k == "se_pool":
            return x * torch.sigmoid(self.se(F.avg_pool2d(x, kernel_size=self.size(x, 3))))
        if k == "pool_shape":  # kernel (H, W) and stride from the input's shape
            pooled = F.avg_pool2d(x, (self.size(x, 2), self.size(x, 3)), stride=self.size(x, 2))
            return x + self.se(pooled)
        if k == "pad_even":
            return F.pad(x, (0, self.size(x, 3) % 2, 0, self.size(x, 2) % 2))
        if k == "crop_to_input":
            return self.bn(self.conv(x))[:, :, :self.size(x, 2), :self.size(x, 3)]
        if k == "scale_by_width":
            return x * (self.size(x, 1) ** -0.5)
        if k == "divide_by_height":
            return x / self.size(x, 2)
        if k == "view_roundtrip":
            return x.view(self.size(x, 0), self.size(x, 1), -1).view(x.shape)
        if k == "interpolate_back":
            y = self.bn(self.conv(x))
            return F.interpolate(y, size=(self.size(x, 2), self.size(x, 3)), mode="nearest")
        if k == "conv_padding":  # padding 1, computed from the input's sizes
            return self.bn(F.conv2d(x, self.weight, None, 1, self.size(x, 1) // self.size(x, 1)))
        if k == "pool_padding":
            return F.avg_pool2d(x, 3, 1, self.size(x, 2) // self.size(x, 2))
        if k == "cat_dim":
            return torch.cat([self.conv_a(x), self.conv_b(x)], dim=x.dim() - 3)
        if k == "add_size":
            return x + self.size(x, 1)
        # slice_channels: the first half of the channels by a size read at run time
        half = self.size(x, 1) // 2
        return torch.cat([self.conv_a(x)[:, :half], self.conv_b(x)], dim=1)[:, :self.c]


class Chain(nn.Module):
    def __init__(self, spec: ChainSpec) -> None:
        super().__init__()
        self.stages = nn.ModuleList(Stage(s, spec.channels) for s in spec.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


@st.composite
def chain_specs(draw) -> ChainSpec:
    stages = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            stages.append(StageSpec("rep", identity=draw(st.booleans())))
        stages.append(StageSpec(draw(st.sampled_from(SIZE_OPS)), shape_attr=draw(st.booleans())))
    if draw(st.booleans()):
        stages.append(StageSpec("rep", identity=draw(st.booleans())))
    size = draw(st.integers(5, 11))  # square: the SE pool reads kernel_size=x.size(3) for both sides
    return ChainSpec(draw(st.sampled_from([2, 4, 6])), tuple(stages), size, size, draw(st.integers(0, 2**31 - 1)))


@SETTINGS
@given(spec=chain_specs())
def test_sizes_of_the_input_as_op_arguments_are_handled_or_refused(spec: ChainSpec) -> None:
    model = _randomize(Chain(spec), spec.seed)
    x = torch.randn(2, spec.channels, spec.h, spec.w, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(spec.seed))
    try:
        report = repq_fx.explain(model)
        _check_exact(model, x)
    except repq_fx.RepQError as e:
        assert str(e)
        return
    # every size-dependent op that would otherwise be linear is listed with its reason
    linear_kinds = {"se_pool", "pool_shape", "pad_even", "crop_to_input", "scale_by_width", "divide_by_height",
                    "conv_padding", "pool_padding", "cat_dim", "add_size"}
    if any(s.kind in linear_kinds for s in spec.stages):
        assert "computed at run time" in str(report), str(report)


def test_strategy_draws_every_size_op() -> None:
    """Guard against the chain strategy silently losing a kind of size-dependent op."""
    seen: set[str] = set()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(spec=chain_specs())
    def collect(spec: ChainSpec) -> None:
        seen.update(s.kind + ("/shape" if s.shape_attr else "") for s in spec.stages)

    collect()
    assert {*SIZE_OPS, *(k + "/shape" for k in SIZE_OPS), "rep"} <= seen


@pytest.mark.parametrize("kind", SIZE_OPS)
def test_each_size_op_alone_is_exact(kind: str) -> None:
    spec = ChainSpec(4, (StageSpec("rep", identity=True), StageSpec(kind), StageSpec("rep")), 7, 7, seed=3)
    model = _randomize(Chain(spec), spec.seed)
    _check_exact(model, torch.randn(2, 4, 7, 7, dtype=torch.float64))
