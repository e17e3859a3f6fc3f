"""explain is the whole truth.

Every conv of the model is in a block of the report or listed with the reason it is left as it is
(inside a module kept whole, not called by forward, refused by the algebra), and nothing stays
float after ``lower`` unless explain lists it. Block names are unique and say where the block is.

Oracles: the model's own module tree (``named_modules``: which convs exist) and the lowered
model's modules and graph (which convs stayed float).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import repq_fx

CONV_TYPES = (nn.modules.conv._ConvNd,)


def _model_convs(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, CONV_TYPES)}


def _accounted(report: repq_fx.Report) -> tuple[set[str], set[str]]:
    """(convs in blocks, convs listed as left out) of a report."""
    in_blocks = {c for b in report.blocks for c in b.convs}
    listed = {name for name, _ in report.left_out}
    return in_blocks, listed


def _float_convs(deploy: fx.GraphModule) -> set[str]:
    """Module paths of the convs that stay float in a lowered model: ``nn.Conv2d`` modules, and
    ``conv2d`` calls on a module's float weight."""
    paths = {name for name, m in deploy.named_modules() if isinstance(m, CONV_TYPES)}
    for node in deploy.graph.nodes:
        if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            w = node.args[1]
            paths.add(w.target.rpartition(".")[0] if isinstance(w, fx.Node) and w.op == "get_attr" else node.name)
    return paths


# ---------------------------------------------------------------------------
# timm mobilevit_xs: MobileVitBlocks are kept whole (timm marks them no-trace).
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mobilevit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("mobilevit_xs", pretrained=False).eval()


def test_every_conv_of_mobilevit_is_in_a_block_or_listed(mobilevit) -> None:
    """Regression: "23 of 23 blocks merged" while the 12 convs inside its three MobileVitBlocks
    were never analysed and nothing said so."""
    report = repq_fx.explain(mobilevit)
    convs = _model_convs(mobilevit)
    in_blocks, listed = _accounted(report)
    assert convs <= in_blocks | listed, sorted(convs - in_blocks - listed)
    assert in_blocks <= convs  # block convs are the model's own modules
    inside = {c for c in convs if re.match(r"stages\.[234]\.1\.", c)}
    assert len(inside) == 12 and inside <= listed, sorted(inside - listed)
    reasons = dict(report.left_out)
    assert all("MobileVitBlock" in reasons[c] and "float" in reasons[c] for c in inside), reasons
    text = str(report)
    assert all(c in text for c in inside), text
    assert "12 convs" in text.splitlines()[0], text.splitlines()[0]


def test_nothing_stays_float_in_lowered_mobilevit_unless_explain_lists_it(mobilevit) -> None:
    report = repq_fx.explain(mobilevit)
    _, listed = _accounted(report)
    qmodel = repq_fx.prepare(mobilevit)
    repq_fx.calibrate(qmodel, [torch.randn(2, 3, 64, 64)])
    deploy = repq_fx.lower(qmodel)
    float_convs = _float_convs(deploy)
    assert float_convs, "the MobileVitBlocks' convs stay float: the check below must see them"
    assert float_convs <= listed, sorted(float_convs - listed)


# ---------------------------------------------------------------------------
# Block names.
# ---------------------------------------------------------------------------

def _check_names(report: repq_fx.Report) -> None:
    names = [b.name for b in report.blocks]
    assert len(set(names)) == len(names), [n for n in names if names.count(n) > 1]
    for b in report.blocks:  # the name is where the block is: a module path its convs live under
        where = b.name.split("@")[0]
        assert all(c == where or c.startswith(where + ".") or not where for c in b.convs), (b.name, b.convs)


def test_squeezenet_block_names_are_unique_and_say_where() -> None:
    """Regression: torchvision squeezenet1_0 showed ``features.3`` three times (a Fire module's
    squeeze, expand1x1 and expand3x3 convs)."""
    tv = pytest.importorskip("torchvision")
    model = tv.models.squeezenet1_0().eval()
    report = repq_fx.explain(model)
    _check_names(report)
    names = {b.name for b in report.blocks}
    assert {"features.3.squeeze", "features.3.expand1x1", "features.3.expand3x3"} <= names, sorted(names)
    in_blocks, listed = _accounted(report)
    assert _model_convs(model) <= in_blocks | listed


def test_a_conv_called_twice_gets_two_names() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.relu(self.conv(x)))

    report = repq_fx.explain(Twice())
    assert [b.name for b in report.blocks] == ["conv", "conv@2"], str(report)
    qmodel = repq_fx.prepare(Twice())  # the names are module paths of the quantizers too
    assert qmodel(torch.randn(2, 4, 6, 6)).shape == (2, 4, 6, 6)


# ---------------------------------------------------------------------------
# Leaves, unused convs: small models.
# ---------------------------------------------------------------------------

class Opaque(nn.Module):
    """Holds a conv; registered as a leaf below (kept whole, never merged)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 2


repq_fx.register_leaf_module(Opaque)


class Unit(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind in ("conv_bn", "unused"):
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        if kind == "unused":
            self.spare = nn.Conv2d(4, 4, 1)  # never called
        if kind == "leaf":
            self.opaque = Opaque()
        if kind == "conv1d":
            self.conv = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("conv_bn", "unused"):
            return torch.relu(self.bn(self.conv(x)))
        if self.kind == "leaf":
            return self.opaque(x)
        n, c, h, w = x.shape
        return self.conv(x.reshape(n, c, h * w)).reshape(n, c, h, w)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from(["conv_bn", "unused", "leaf", "conv1d"]), min_size=1, max_size=5))
def test_every_conv_is_in_a_block_or_listed_with_a_reason(kinds: list[str]) -> None:
    model = nn.Sequential(*[Unit(k) for k in kinds]).eval()
    report = repq_fx.explain(model)
    in_blocks, listed = _accounted(report)
    assert _model_convs(model) <= in_blocks | listed, (kinds, str(report))
    _check_names(report)
    reasons = dict(report.left_out)
    for i, kind in enumerate(kinds):
        if kind == "leaf":
            assert "register_leaf_module" in reasons[f"{i}.opaque.conv"], reasons
        if kind == "unused":
            assert "not called" in reasons[f"{i}.spare"], reasons
        if kind == "conv1d":
            assert "2-d" in reasons[f"{i}.conv"], reasons
    if report.blocks:  # something to quantize: what stays float after lower is listed
        qmodel = repq_fx.prepare(model)
        repq_fx.calibrate(qmodel, [torch.randn(2, 4, 5, 5)])
        assert _float_convs(repq_fx.lower(qmodel)) <= listed


# ---------------------------------------------------------------------------
# Trace into a module timm marks no-trace when FX can trace it.
# ---------------------------------------------------------------------------

def test_a_traceable_no_trace_module_is_traced_into() -> None:
    """timm marks modules no-trace for its own feature extraction; where torch.fx can trace one
    (no data-dependent Python, no in-place op FX could drop), its convs become blocks."""
    timm_fx = pytest.importorskip("timm.layers")

    @timm_fx.register_notrace_module
    class PlainNoTrace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(self.conv(x)))

    @timm_fx.register_notrace_module
    class BranchyNoTrace(PlainNoTrace):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if x.shape[-1] % 2 else torch.relu(y)  # Python branch on a size: FX cannot

    @timm_fx.register_notrace_module
    class InPlaceNoTrace(PlainNoTrace):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            y.mul_(0.5)  # result unused: FX's dead-code elimination would drop it (timm's nfnet case)
            return y

    model = nn.Sequential(PlainNoTrace(), BranchyNoTrace(), InPlaceNoTrace()).eval()
    report = repq_fx.explain(model)
    in_blocks, listed = _accounted(report)
    assert in_blocks == {"0.conv"} and listed == {"1.conv", "2.conv"}, str(report)
    reasons = dict(report.left_out)
    assert "BranchyNoTrace" in reasons["1.conv"] and "TraceError" in reasons["1.conv"], reasons
    assert "InPlaceNoTrace" in reasons["2.conv"] and "mul_ in place" in reasons["2.conv"], reasons
    merged = repq_fx.merge(model)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), atol=1e-5)
