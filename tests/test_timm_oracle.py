"""timm as the oracle for ``repq_fx.merge`` (docs/design.md: timm's own merge is the external oracle).

For every model of the smallest CI set that covers timm's re-parametrization algebra
(plus repvgg_a0 with ``output_stride=8``, i.e. dilated stages) and for timm's rep blocks
built directly:

(a) ``merge(model)(x)`` equals ``model(x)`` (float64, relative max error <= 1e-9);
(b) the merged model runs no more convs than ``timm.utils.reparameterize_model`` (and timm's
    own deploy model equals the original too, as a check of the oracle);
(c) the input model is left alone: bit-identical ``state_dict`` and the same ``.training``;
(d) no BatchNorm survives inside a merged block: no conv feeds a BN as its only user, and no
    more BatchNorm2d calls remain than in timm's deploy model (zero for RepVGG/MobileOne).

Convs and BNs are counted at run time with a ``TorchFunctionMode`` (every ``conv2d`` /
``batch_norm`` call, whether from a module, a functional node, or inside a leaf module), so
the count is the same measure for timm's ``nn.Module`` and for our ``GraphModule``.

Models are built with ``pretrained=False``, in float64; per-channel parameters (BN affine,
layer scales) are perturbed so that no branch is switched off by its init (zero-init BN
gammas, FastViT's 1e-5 layer scale), then BN running statistics are calibrated with
``momentum=None`` and 3 train-mode forwards on random 64x64 data.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

timm = pytest.importorskip("timm")
from timm.utils import reparameterize_model

import repq_fx

REL_TOL = 1e-9
SPATIAL = 64


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """CI runs ``pytest -n 2`` on 2 cores: one intra-op thread per worker avoids oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _input(channels: int = 3, batch: int = 2, spatial: tuple[int, int] = (SPATIAL, SPATIAL),
           seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *spatial, generator=g, dtype=torch.float64)


def _calibrate(model: nn.Module, channels: int = 3, spatial: tuple[int, int] = (SPATIAL, SPATIAL),
               seed: int = 0) -> nn.Module:
    """float64; per-channel parameters perturbed; BN running stats from 3 train-mode forwards; eval."""
    torch.manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == p.shape[0]:  # per-channel vectors: BN affine, biases, layer scales [C, 1, 1]
                p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        model.train()
        for step in range(3):
            model(_input(channels, batch=4, spatial=spatial, seed=100 + step))
    return model.eval()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> list[str]:
    state = module.state_dict()
    if state.keys() != snapshot.keys():
        return sorted(set(state) ^ set(snapshot))
    return [k for k, v in snapshot.items() if not torch.equal(state[k], v)]


class _OpCounter(TorchFunctionMode):
    """Counts conv2d and (4-D input) batch_norm calls made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "conv2d":
            self.counts["conv2d"] += 1
        elif name == "batch_norm" and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            self.counts["batch_norm2d"] += 1
        return func(*args, **(kwargs or {}))


def _run_counting(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, collections.Counter]:
    counter = _OpCounter()
    with torch.no_grad(), counter:
        out = model(x)
    return out, counter.counts


def _is_conv(gm: fx.GraphModule, node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Conv2d)
    return node.op == "call_function" and node.target in (F.conv2d, torch.conv2d)


def _is_bn(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)
    return node.op == "call_function" and "batch_norm" in getattr(node.target, "__name__", "")


def _graph_conv_count(gm: fx.GraphModule) -> int:
    """Convs in the graph itself: ``call_module`` of an ``nn.Conv2d`` plus functional ``conv2d`` calls."""
    return sum(_is_conv(gm, n) for n in gm.graph.nodes)


def _unfolded_conv_bn(gm: fx.GraphModule) -> list[str]:
    """BN nodes whose input is a conv with no other user: a conv -> BN pair that should have been folded."""
    return [n.name for n in gm.graph.nodes
            if _is_bn(gm, n) and _is_conv(gm, n.args[0]) and len(n.args[0].users) == 1]


def _timm_deploy(model: nn.Module) -> nn.Module:
    """timm's own deploy model. RepViT's ``fuse()`` builds convs in the default dtype, hence float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return reparameterize_model(model, inplace=False).eval()
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------
# Whole timm models: one module-scoped fixture per model does the expensive work once.
# ---------------------------------------------------------------------------

MODELS = [
    pytest.param(("repvgg_a0", {}), id="repvgg_a0"),
    pytest.param(("repvgg_a0", {"output_stride": 8}), id="repvgg_a0-os8"),  # dilated stages
    pytest.param(("repvgg_b1g4", {}), id="repvgg_b1g4"),  # grouped 3x3 and 1x1, g=4
    pytest.param(("mobileone_s0", {}), id="mobileone_s0"),  # 4 conv branches, dw + pw
    pytest.param(("fastvit_t8", {}), id="fastvit_t8"),  # RepMixer, large kernel
    pytest.param(("fastvit_sa12", {}), id="fastvit_sa12"),  # + RepConditionalPosEnc
    pytest.param(("repghostnet_050", {}), id="repghostnet_050"),
    pytest.param(("repvit_m0_9", {}), id="repvit_m0_9"),  # post-BN
    pytest.param(("repvit_m1", {}), id="repvit_m1"),  # legacy RepVggDw
    pytest.param(("ghostnetv3_050", {}), id="ghostnetv3_050"),
    pytest.param(("lcnetv2_small", {}), id="lcnetv2_small"),  # multi-scale depthwise
]

# BatchNorm2d calls that must be gone entirely (every BN in these nets sits right after a conv).
NO_BN_LEFT = {"repvgg_a0", "repvgg_b1g4", "mobileone_s0"}


@dataclasses.dataclass
class TimmCase:
    name: str
    model: nn.Module
    x: torch.Tensor
    expected: torch.Tensor
    merged: fx.GraphModule
    merged_out: torch.Tensor
    merged_counts: collections.Counter
    timm_out: torch.Tensor
    timm_counts: collections.Counter
    original_counts: collections.Counter
    changed_by_merge: list[str]
    changed_by_explain: list[str]
    training_after: tuple[bool, bool]
    report: Any


@pytest.fixture(scope="module", params=MODELS)
def case(request) -> TimmCase:
    name, kwargs = request.param
    model = _calibrate(timm.create_model(name, pretrained=False, **kwargs))
    x = _input()
    expected, original_counts = _run_counting(model, x)

    before = _snapshot(model)
    merged = repq_fx.merge(model)
    changed_by_merge = _changed(model, before)
    training_after_merge = model.training
    report = repq_fx.explain(model)
    changed_by_explain = _changed(model, before)
    training_after_explain = model.training

    merged_out, merged_counts = _run_counting(merged, x)
    timm_out, timm_counts = _run_counting(_timm_deploy(model), x)
    return TimmCase(name, model, x, expected, merged, merged_out, merged_counts, timm_out, timm_counts,
                    original_counts, changed_by_merge, changed_by_explain,
                    (training_after_merge, training_after_explain), report)


def test_merge_equals_model(case: TimmCase) -> None:  # (a)
    assert isinstance(case.merged, fx.GraphModule)
    assert not case.merged.training, "merge returns an eval-mode model"
    assert case.merged_out.shape == case.expected.shape
    assert _rel_err(case.merged_out, case.expected) <= REL_TOL


def test_timm_oracle_equals_model(case: TimmCase) -> None:  # sanity check of the oracle itself
    assert _rel_err(case.timm_out, case.expected) <= REL_TOL
    assert _rel_err(case.merged_out, case.timm_out) <= REL_TOL


def test_conv_count_at_most_timm(case: TimmCase) -> None:  # (b)
    ours, theirs = case.merged_counts["conv2d"], case.timm_counts["conv2d"]
    assert ours <= theirs, f"{case.name}: merged model runs {ours} convs, timm's deploy model {theirs}"
    # Something was merged: fewer convs, or (RepGhost: dw conv + BN -> dw conv) fewer BNs.
    assert (ours, case.merged_counts["batch_norm2d"]) < (
        case.original_counts["conv2d"], case.original_counts["batch_norm2d"]), "nothing was merged"
    # Every conv call of the merged model is visible in its graph (no convs hidden in leaf modules here).
    assert _graph_conv_count(case.merged) == ours


def test_input_model_untouched(case: TimmCase) -> None:  # (c)
    assert not case.changed_by_merge, f"merge mutated the input model: {case.changed_by_merge}"
    assert not case.changed_by_explain, f"explain mutated the input model: {case.changed_by_explain}"
    assert case.training_after == (False, False), "merge/explain changed the input model's mode"
    with torch.no_grad():
        assert torch.equal(case.model(case.x), case.expected)


def test_no_batchnorm_inside_merged_blocks(case: TimmCase) -> None:  # (d)
    assert _unfolded_conv_bn(case.merged) == []
    ours, theirs = case.merged_counts["batch_norm2d"], case.timm_counts["batch_norm2d"]
    assert ours <= theirs, f"{case.name}: {ours} BatchNorm2d calls left, timm's deploy model has {theirs}"
    if case.name in NO_BN_LEFT:
        assert ours == 0


def test_report_agrees_with_merge(case: TimmCase) -> None:
    report = case.report
    assert report.blocks and not report.not_merged, str(report)
    removed = case.original_counts["conv2d"] - case.merged_counts["conv2d"]
    assert sum(b.num_convs - 1 for b in report.merged) == removed
    assert str(report).startswith(type(case.model).__name__)


# ---------------------------------------------------------------------------
# timm's rep blocks built directly: each must become exactly one conv.
# ---------------------------------------------------------------------------

def _fastvit_cls(name: str) -> Callable[..., nn.Module]:
    from timm.models import fastvit
    cls = getattr(fastvit, name, None)
    if cls is None:
        pytest.skip(f"timm.models.fastvit.{name} does not exist in this timm")
    return cls


def _byobnet_cls(name: str) -> Callable[..., nn.Module]:
    from timm.models import byobnet
    return getattr(byobnet, name)


BLOCKS = [
    pytest.param(lambda: _byobnet_cls("RepVggBlock")(16, 16, group_size=4), 16, id="byobnet-RepVggBlock-g4"),
    pytest.param(lambda: _byobnet_cls("RepVggBlock")(16, 32, stride=2, group_size=4), 16,
                 id="byobnet-RepVggBlock-s2-g4"),
    pytest.param(lambda: _byobnet_cls("RepVggBlock")(16, 16, dilation=(2, 2)), 16, id="byobnet-RepVggBlock-d2"),
    pytest.param(lambda: _byobnet_cls("MobileOneBlock")(16, 16, 3, group_size=1, num_conv_branches=4), 16,
                 id="byobnet-MobileOneBlock-k4"),
    pytest.param(lambda: _byobnet_cls("MobileOneBlock")(16, 16, 3, stride=2, group_size=1, num_conv_branches=4),
                 16, id="byobnet-MobileOneBlock-k4-s2"),
    pytest.param(lambda: _byobnet_cls("MobileOneBlock")(16, 32, 1, group_size=0, num_conv_branches=2), 16,
                 id="byobnet-MobileOneBlock-pw"),
    pytest.param(lambda: _fastvit_cls("MobileOneBlock")(16, 16, 3, group_size=1, num_conv_branches=3), 16,
                 id="fastvit-MobileOneBlock-dw"),
    pytest.param(lambda: _fastvit_cls("RepMixer")(16), 16, id="fastvit-RepMixer"),
    pytest.param(lambda: _fastvit_cls("ReparamLargeKernelConv")(16, 16, 7, 2, 1, small_kernel=3), 16,
                 id="fastvit-ReparamLargeKernelConv-s2"),
    pytest.param(lambda: _fastvit_cls("ReparamLargeKernelConv")(16, 16, 7, 1, 1, small_kernel=3), 16,
                 id="fastvit-ReparamLargeKernelConv-s1"),
    pytest.param(lambda: _fastvit_cls("RepConditionalPosEnc")(16, 16), 16, id="fastvit-RepConditionalPosEnc"),
    pytest.param(lambda: _fastvit_cls("RepConditionalPosEnc")(16, 16, spatial_shape=(5, 5)), 16,
                 id="fastvit-RepConditionalPosEnc-5x5"),  # non-square shapes pad wrongly in timm itself
]

BLOCK_SPATIAL = (11, 13)  # odd and non-square, so row/column mix-ups show


def _reparameterized(block: nn.Module) -> nn.Module:
    """timm's own deploy form of one block (``reparameterize()`` on a deep copy), in float64."""
    block = copy.deepcopy(block)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        block.reparameterize()
    finally:
        torch.set_default_dtype(previous)
    return block.eval()


@pytest.mark.parametrize("make, channels", BLOCKS)
def test_timm_block_merges_to_one_conv(make: Callable[[], nn.Module], channels: int) -> None:
    block = _calibrate(make(), channels, spatial=BLOCK_SPATIAL)
    x = _input(channels, spatial=BLOCK_SPATIAL)
    with torch.no_grad():
        expected = block(x)
    before = _snapshot(block)

    merged = repq_fx.merge(block)

    assert _graph_conv_count(merged) == 1, merged.code
    out, counts = _run_counting(merged, x)
    assert counts["conv2d"] == 1 and counts["batch_norm2d"] == 0, merged.code
    assert _rel_err(out, expected) <= REL_TOL
    assert not _changed(block, before) and not block.training
    # timm's own reparameterize() agrees (oracle sanity check).
    with torch.no_grad():
        assert _rel_err(_reparameterized(block)(x), expected) <= REL_TOL

    report = repq_fx.explain(block)
    assert len(report.blocks) == 1 and report.blocks[0].merged, str(report)
    assert report.blocks[0].num_convs == sum(isinstance(m, nn.Conv2d) for m in block.modules())


@pytest.mark.parametrize("make, channels", BLOCKS[:1] + BLOCKS[3:4] + BLOCKS[7:8])
def test_timm_block_given_in_train_mode(make: Callable[[], nn.Module], channels: int) -> None:
    block = _calibrate(make(), channels, spatial=BLOCK_SPATIAL).train()
    x = _input(channels, spatial=BLOCK_SPATIAL)
    before = _snapshot(block)

    merged = repq_fx.merge(block, (x,))  # example_inputs run a shape pass: still no BN statistics update

    assert block.training, "merge must not switch the input model's mode"
    assert not _changed(block, before), "merge updated the input model's BN statistics"
    assert _graph_conv_count(merged) == 1, merged.code
    with torch.no_grad():
        assert _rel_err(merged(x), block.eval()(x)) <= REL_TOL
