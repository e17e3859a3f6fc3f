"""Bad or unusual inputs to ``repq_fx.merge`` / ``repq_fx.explain``.

- A model FX cannot trace raises ``CaptureError`` (a ``RepQError``) that carries FX's own reason
  and says what to do (``register_leaf_module``, ``concrete_args``); both remedies work.
- A model without convs is not an error: an empty report and an equivalent module.
- Convs the algebra cannot express (non-zero padding modes, even kernels with ``padding='same'``)
  and BNs that use batch statistics in eval mode are left alone: the merged model stays exact
  and ``explain`` does not claim to have merged them.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repq_fx

REL_TOL = 1e-9


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _input(channels: int, spatial: tuple[int, int] = (9, 11), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, *spatial, generator=g, dtype=torch.float64) + 0.5


def _randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """float64, eval, with non-trivial BN statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                    m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=torch.float64))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=torch.float64))
                    m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return module.eval()


def _conv_modules_called(gm: fx.GraphModule) -> list[nn.Conv2d]:
    modules = dict(gm.named_modules())
    return [modules[n.target] for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)]


def _conv_count(gm: fx.GraphModule) -> int:
    functional = sum(n.op == "call_function" and n.target in (F.conv2d, torch.conv2d) for n in gm.graph.nodes)
    return len(_conv_modules_called(gm)) + functional


def _bn_count(gm: fx.GraphModule) -> int:
    modules = dict(gm.named_modules())
    return sum((n.op == "call_module" and isinstance(modules[n.target], nn.modules.batchnorm._BatchNorm))
               or (n.op == "call_function" and "batch_norm" in getattr(n.target, "__name__", ""))
               for n in gm.graph.nodes)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    state = module.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], v) for k, v in snapshot.items())


# ---------------------------------------------------------------------------
# Models FX cannot trace.
# ---------------------------------------------------------------------------

class DataDependent(nn.Module):
    """``if x.sum() > 0`` on a traced tensor: FX cannot follow this."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return self.bn(self.conv(x))


class WithDataDependentPart(nn.Module):
    """A mergeable conv + BN followed by an untraceable submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gate = _Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.bn(self.conv(x)))


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x
        return -x


class FlagArgument(nn.Module):
    """A Python flag argument steers control flow: fine with concrete_args."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, double: bool = True) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if double:
            y = y * 2
        return y


def _fx_reason(model: nn.Module) -> str:
    """What torch.fx itself says when it fails to trace ``model``."""
    with pytest.raises(Exception) as info:
        fx.symbolic_trace(copy.deepcopy(model))
    return str(info.value)


@pytest.mark.parametrize("entry", [repq_fx.merge, repq_fx.explain], ids=["merge", "explain"])
@pytest.mark.parametrize("make", [DataDependent, WithDataDependentPart], ids=["top-level", "submodule"])
def test_untraceable_model_raises_capture_error(entry, make) -> None:
    model = _randomized(make())
    before = _snapshot(model)

    with pytest.raises(repq_fx.CaptureError) as info:
        entry(model)

    err = info.value
    assert isinstance(err, repq_fx.RepQError)
    message = str(err)
    reason = _fx_reason(model)
    assert reason and reason in message, f"FX's reason {reason!r} missing from {message!r}"
    assert "register_leaf_module" in message
    assert "concrete_args" in message
    assert type(model).__name__ in message
    assert _unchanged(model, before) and not model.training


class _LeafGate(nn.Module):
    """Same as ``_Gate``; a separate class so registering it as a leaf touches nothing else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x
        return -x


def test_register_leaf_module_remedy() -> None:
    model = WithDataDependentPart()
    model.gate = _LeafGate()
    model = _randomized(model)
    with pytest.raises(repq_fx.CaptureError):
        repq_fx.merge(model)

    repq_fx.register_leaf_module(_LeafGate)
    merged = repq_fx.merge(model)

    x = _input(3)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
        assert _rel_err(merged(-x), model(-x)) <= REL_TOL  # the leaf keeps its control flow
    assert _conv_count(merged) == 1 and _bn_count(merged) == 0, merged.code
    assert len(repq_fx.explain(model).merged) == 1


def test_concrete_args_remedy() -> None:
    model = _randomized(FlagArgument())
    with pytest.raises(repq_fx.CaptureError, match="concrete_args"):
        repq_fx.merge(model)

    traced = fx.symbolic_trace(model, concrete_args={"double": True})
    merged = repq_fx.merge(traced)

    x = _input(3)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
    assert _conv_count(merged) == 1 and _bn_count(merged) == 0, merged.code


def test_example_inputs_that_do_not_fit_raise_capture_error() -> None:
    model = _randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(repq_fx.CaptureError) as info:
        repq_fx.merge(model, (torch.randn(1, 5, 8, 8, dtype=torch.float64),))
    assert isinstance(info.value, repq_fx.RepQError)
    assert "example_inputs" in str(info.value)


# ---------------------------------------------------------------------------
# Nothing to merge.
# ---------------------------------------------------------------------------

NO_CONV_MODELS = [
    pytest.param(lambda: nn.Sequential(nn.Linear(4, 4)), (3, 4), id="linear"),
    pytest.param(lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (3, 4), id="mlp"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2)), (2, 4, 6, 6),
                 id="bn-pool"),
    pytest.param(lambda: nn.Identity(), (2, 3), id="identity"),
]


@pytest.mark.parametrize("make, shape", NO_CONV_MODELS)
def test_model_without_convs(make, shape) -> None:
    model = _randomized(make())
    x = torch.randn(*shape, dtype=torch.float64)
    before = _snapshot(model)

    report = repq_fx.explain(model)
    merged = repq_fx.merge(model)

    assert report.blocks == () and report.merged == () and report.not_merged == ()
    assert isinstance(str(report), str) and str(report).startswith(type(model).__name__)
    assert isinstance(merged, fx.GraphModule)
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), rtol=0, atol=1e-12)
    assert _unchanged(model, before)


# ---------------------------------------------------------------------------
# Convs and BNs the algebra cannot express are left alone.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_mode_conv_is_left_alone(padding_mode: str) -> None:
    model = _randomized(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode=padding_mode),
                                      nn.BatchNorm2d(4), nn.ReLU()))
    x = _input(4)
    before = _snapshot(model)

    merged = repq_fx.merge(model)

    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
    convs = _conv_modules_called(merged)
    assert [c.padding_mode for c in convs] == [padding_mode], merged.code  # still the original conv
    assert _unchanged(model, before)
    report = repq_fx.explain(model)
    assert sum(b.num_convs for b in report.merged) == 0, str(report)  # no claim to have merged it


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_mode_conv_next_to_mergeable_block(padding_mode: str) -> None:
    """reflect conv -> BN -> (1x1 -> BN): the second pair is an ordinary block and must still merge."""
    model = _randomized(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, padding_mode=padding_mode),
                                      nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)))
    x = _input(4)

    merged = repq_fx.merge(model)

    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
    assert _conv_count(merged) == 2, merged.code
    assert [c.padding_mode for c in _conv_modules_called(merged)].count(padding_mode) == 1
    assert _bn_count(merged) <= 1, merged.code  # the 1x1's BN is folded
    report = repq_fx.explain(model)
    assert [b.num_convs for b in report.merged] == [1], str(report)
    assert report.merged[0].kernel == (1, 1)


def test_explain_mentions_conv_with_non_zero_padding_mode() -> None:
    model = _randomized(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4)))
    report = repq_fx.explain(model)
    mentioned = report.not_merged or report.left_out or any(b.reason for b in report.blocks)
    assert mentioned, f"nothing in the report says why the reflect conv + BN was left alone:\n{report}"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_even_kernel_same_padding_is_left_alone() -> None:
    # torch pads an even 'same' kernel asymmetrically; no symmetric-padding conv equals it.
    model = _randomized(nn.Sequential(nn.Conv2d(4, 4, 2, padding="same"), nn.BatchNorm2d(4)))
    x = _input(4)
    merged = repq_fx.merge(model)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
    assert sum(b.num_convs for b in repq_fx.explain(model).merged) == 0


def test_bn_without_running_stats_is_not_folded() -> None:
    # track_running_stats=False: eval mode still normalizes with batch statistics.
    model = _randomized(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)))
    x = _input(4)
    merged = repq_fx.merge(model)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
        assert _rel_err(merged(x[:1]), model(x[:1])) <= REL_TOL  # different batch, different statistics
    assert _bn_count(merged) == 1, merged.code
    report = repq_fx.explain(model)
    assert "batch statistics" in str(report)
    assert all("bn" not in b.branches for b in report.merged), str(report)


def test_concrete_args_specialization_guard_is_kept() -> None:
    model = _randomized(FlagArgument())
    traced = fx.symbolic_trace(model, concrete_args={"double": True})
    x = _input(3)
    with pytest.raises(AssertionError):
        traced(x, False)  # FX's own guard
    merged = repq_fx.merge(traced)
    with pytest.raises(AssertionError):
        merged(x, False)  # the guard survives canonicalization
