"""Structure decided from current parameter values.

``prepare`` emits a graph that training runs for many steps, so every decision it takes from the
value of a trainable tensor (a parameter that requires grad, a BN running statistic) must hold for
every value that tensor can take: a bias that is exactly 0 at initialisation is not 0 after one
step. These tests build models at their default initialisation (zeros and ones where torch puts
them), prepare them, then move every parameter and running statistic, in the prepared model and in
the original alike, and compare (float64, fake quant off, train and eval mode).

The one known exception stays: DBB's BNAndPadLayer pads with a value computed from the *running*
statistics while its BN normalizes with *batch* statistics in train mode, so the train-mode DBB is
not one conv of its input (see test_prepare.test_dbb_equals_original_eval); blocks with that pad are
compared in eval mode only.
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
from test_merge_properties import HazardBlock, RandomBlock, hazard_specs, mergeable_specs
from exactness import REL_TOL, rel_err as _rel_err

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])
_BN = nn.modules.batchnorm._BatchNorm


def _prepare_float(model: nn.Module) -> nn.Module:
    qmodel = repq_fx.prepare(model)
    repq_fx.disable_fake_quant(qmodel)
    return qmodel


def _perturb(modules: list[nn.Module], seed: int, scale: float = 0.5) -> None:
    """Move every parameter and BN running statistic, by name, by the same amount in each module."""
    g = torch.Generator().manual_seed(seed)
    reference = dict(modules[0].state_dict())
    steps = {}
    for name, t in reference.items():
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            steps[name] = ("mul", 0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64))
        else:
            steps[name] = ("add", scale * torch.randn(t.shape, generator=g, dtype=torch.float64))
    with torch.no_grad():
        for module in modules:
            state = module.state_dict()
            for name, (how, step) in steps.items():
                if how == "mul":
                    state[name].mul_(step.to(state[name].dtype))
                else:
                    state[name].add_(step.to(state[name].dtype))


def _check_after_moving_the_parameters(model: nn.Module, x: torch.Tensor, seed: int, train: bool = True) -> None:
    """prepare at today's values, move every value in both, compare in eval (and train) mode."""
    qmodel = _prepare_float(model)
    original = copy.deepcopy(model)
    _perturb([original, qmodel], seed)
    with torch.no_grad():
        assert _rel_err(qmodel.eval()(x), original.eval()(x)) <= REL_TOL, qmodel.code
        if train:
            assert _rel_err(qmodel.train()(x), original.train()(x)) <= REL_TOL, qmodel.code
            assert _rel_err(qmodel.eval()(x), original.eval()(x)) <= REL_TOL  # after the same running-stat step


def _input(channels: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(2, channels, h, w, generator=g, dtype=torch.float64) + 0.5


# ---------------------------------------------------------------------------
# Regressions.
# ---------------------------------------------------------------------------

def test_conv1x1_bn_padded_conv3x3_at_initialisation_in_train_mode() -> None:
    """Regression: at initialisation the BN's shift is exactly 0, so prepare merged the 1x1 -> BN into
    the zero-padded 3x3 as if the BN's response to a zero pixel were 0 forever. In train mode the
    batch mean makes it non-zero at once: 0.057 off (relative) on the first forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6),
                          nn.Conv2d(6, 5, 3, padding=1)).double()
    x = _input(4, 7, 9, seed=0)
    qmodel = _prepare_float(model)
    with torch.no_grad():
        assert _rel_err(qmodel.train()(x), copy.deepcopy(model).train()(x)) <= REL_TOL
    report = repq_fx.explain(model)
    assert "true for the current values only" in str(report), str(report)


def test_item_of_a_parameter_is_read_every_step() -> None:
    """Regression: a scale written ``y * self.alpha.item()`` was folded into the prepared graph as the
    number alpha had at prepare time."""

    class ItemScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.alpha = nn.Parameter(torch.tensor(0.7))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x) * self.alpha.item())

    torch.manual_seed(1)
    model = ItemScale().double()
    _check_after_moving_the_parameters(model, _input(3, 6, 7, seed=1), seed=1)


def test_hgnetv2_b0_gradients_equal_the_original() -> None:
    """Regression: timm hgnetv2_b0's LearnableAffineBlock bias (0 at initialisation) is followed by a
    zero pad and a conv; prepare merged it as if it stayed 0, and the train-mode BN after the conv
    then cancelled it: gradient ~1e-17 against -0.047 in the original, so QAT could never learn it."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("hgnetv2_b0", pretrained=False, num_classes=10).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    qmodel = _prepare_float(model).train()
    original = copy.deepcopy(model).train()
    weights = torch.randn(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (original(x) * weights).sum().backward()
    (qmodel(x) * weights).sum().backward()
    prepared = dict(qmodel.named_parameters())
    # biases right before a train-mode BN get a gradient of rounding noise (~1e-15) in both models:
    # each tensor is compared relative to its own scale, or to 1e-6 of the largest gradient if tinier
    floor = 1e-6 * max(p.grad.abs().max().item() for p in original.parameters())
    worst = {}
    for name, p in original.named_parameters():
        assert prepared[name].grad is not None, name
        worst[name] = (prepared[name].grad - p.grad).abs().max().item() / max(p.grad.abs().max().item(), floor)
    assert abs(dict(original.named_parameters())["stem.stem2a.lab.bias"].grad.item()) > 1e-3  # the premise
    bad = {k: v for k, v in worst.items() if v > REL_TOL}
    assert not bad, bad


# ---------------------------------------------------------------------------
# Property: prepare at initialisation, then move every value.
# ---------------------------------------------------------------------------

def _at_initialisation(model: nn.Module, seed: int, zero_biases: bool) -> nn.Module:
    """float64, torch's default initialisation (BN: weight 1, bias 0, mean 0, var 1); conv biases
    zeroed when ``zero_biases`` (as many models initialise them); eval mode."""
    torch.manual_seed(seed)
    model = model.double()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, _BN)):
            m.reset_parameters()
        if zero_biases and isinstance(m, nn.Conv2d) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model.eval()


@dataclasses.dataclass(frozen=True)
class ValueHazardSpec:
    """A block whose merge holds at initialisation only (a zero bias, a BN shift of 0, a learned pad
    value of 0), or holds for every value (the ``*_identity`` families): both must stay exact."""

    family: str
    cin: int
    mid: int
    cout: int
    k: tuple[int, int]
    stride: int
    seed: int
    h: int
    w: int


VALUE_FAMILIES = ("bias_1x1_pad", "bn_1x1_pad", "affine_pad", "bn_pad", "learned_pad_value",
                  "two_pad_values", "bias_pad_identity", "bn_pad_identity")


class ValueHazard(nn.Module):
    def __init__(self, s: ValueHazardSpec) -> None:
        super().__init__()
        self.s = s
        c = s.cin if s.family in ("affine_pad", "bn_pad", "two_pad_values") else s.mid
        self.pad = (s.k[1] // 2, s.k[1] // 2, s.k[0] // 2, s.k[0] // 2)
        if s.family in ("bias_1x1_pad", "bn_1x1_pad", "learned_pad_value", "bias_pad_identity", "bn_pad_identity"):
            self.first = nn.Conv2d(s.cin, c, 1, bias=s.family in ("bias_1x1_pad", "bias_pad_identity"))
        if s.family in ("bn_1x1_pad", "bn_pad", "learned_pad_value", "bn_pad_identity"):
            self.bn = nn.BatchNorm2d(c)
        if s.family == "affine_pad":  # hgnetv2's LearnableAffineBlock: scale 1, bias 0 at initialisation
            self.scale = nn.Parameter(torch.ones(1))
            self.bias = nn.Parameter(torch.zeros(1))
        if s.family in ("learned_pad_value", "two_pad_values"):
            self.value = nn.Parameter(torch.zeros(c, 1, 1))
        if s.family == "two_pad_values":
            self.other_value = nn.Parameter(torch.zeros(c, 1, 1))
            self.other = nn.Conv2d(c, s.cout, s.k, s.stride, 0, bias=False)
        valid = s.family in ("learned_pad_value", "two_pad_values", "bias_pad_identity", "bn_pad_identity",
                             "affine_pad")  # these pad with F.pad, then a valid conv
        self.conv = nn.Conv2d(c, s.cout, s.k, s.stride, 0 if valid else (s.k[0] // 2, s.k[1] // 2), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.s.family
        if f in ("bias_1x1_pad", "bn_1x1_pad"):  # the conv zero-pads what the 1x1 (+ BN) computed
            y = self.first(x)
            return self.conv(self.bn(y) if f == "bn_1x1_pad" else y)
        if f == "affine_pad":
            return self.conv(F.pad(x * self.scale + self.bias, self.pad))
        if f == "bn_pad":
            return self.conv(self.bn(x))
        if f == "learned_pad_value":  # pads with a parameter, not with the BN's response
            y = self.bn(self.first(x))
            return self.conv(F.pad(y - self.value, self.pad) + self.value)
        if f == "two_pad_values":
            a = self.conv(F.pad(x - self.value, self.pad) + self.value)
            return a + self.other(F.pad(x - self.other_value, self.pad) + self.other_value)
        if f == "bias_pad_identity":  # ECB: pads with the 1x1's own bias
            b = self.first.bias.view(1, -1, 1, 1)
            return self.conv(F.pad(self.first(x) - b, self.pad) + b)
        # bn_pad_identity: DBB, pads with the BN's response to a zero pixel (running statistics)
        bn = self.bn
        v = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
        return self.conv(F.pad(bn(self.first(x)) - v, self.pad) + v)


@st.composite
def value_hazard_specs(draw) -> ValueHazardSpec:
    k = draw(st.tuples(st.sampled_from([1, 3, 5]), st.sampled_from([1, 3, 5])).filter(lambda k: max(k) > 1))
    return ValueHazardSpec(draw(st.sampled_from(VALUE_FAMILIES)), draw(st.integers(1, 4)), draw(st.integers(1, 5)),
                           draw(st.integers(1, 4)), k, draw(st.sampled_from([1, 2])), draw(st.integers(0, 2**31 - 1)),
                           draw(st.integers(5, 12)), draw(st.integers(5, 12)))


def _build_block(spec) -> nn.Module:
    if isinstance(spec, ValueHazardSpec):
        return ValueHazard(spec)
    return RandomBlock(spec) if hasattr(spec, "branches") else HazardBlock(spec)


def _dbb_pad(spec) -> bool:
    if isinstance(spec, ValueHazardSpec):
        return spec.family == "bn_pad_identity"
    return any(b.kind == "seq1k" and b.dbb_pad for b in getattr(spec, "branches", ()))


@SETTINGS
@given(spec=st.one_of(value_hazard_specs(), value_hazard_specs(), mergeable_specs(), hazard_specs()),
       zero_biases=st.booleans())
def test_prepared_block_follows_every_parameter_value(spec, zero_biases: bool) -> None:
    model = _at_initialisation(_build_block(spec), spec.seed, zero_biases)
    x = _input(spec.cin, spec.h, spec.w, spec.seed)
    _check_after_moving_the_parameters(model, x, spec.seed, train=not _dbb_pad(spec))


def test_merge_still_uses_only_exact_identities() -> None:
    """The DBB and ECB pads are identities of the parameters (the pad value is computed from the
    same parameters as the response it replaces), so they still merge into one conv."""
    from repq_fx.testing import blocks as B

    for make, channels in ((lambda: B.DiverseBranchBlock(8, 16, 3), 8),
                           (lambda: B.ECB(8, 8, depth_multiplier=2.0, act_type="linear", with_idt=True), 8)):
        torch.manual_seed(0)
        block = make().double().eval()
        report = repq_fx.explain(block)
        assert len(report.blocks) == 1 and report.blocks[0].merged and not report.blocks[0].reason, str(report)
        x = _input(channels, 9, 10, seed=2)
        with torch.no_grad():
            assert _rel_err(repq_fx.merge(block)(x), block(x)) <= REL_TOL
        _check_after_moving_the_parameters(block, x, seed=2, train=not isinstance(block, B.DiverseBranchBlock))


@pytest.mark.parametrize("family", VALUE_FAMILIES)
def test_each_value_hazard_family(family: str) -> None:
    spec = ValueHazardSpec(family, 3, 4, 2, (3, 3), 1, seed=5, h=7, w=8)
    model = _at_initialisation(ValueHazard(spec), spec.seed, zero_biases=True)
    _check_after_moving_the_parameters(model, _input(3, 7, 8, seed=5), seed=5, train=not _dbb_pad(spec))
    if family.endswith("_identity"):  # still one conv: the pad value is the response, for every value
        report = repq_fx.explain(model)
        assert len(report.blocks) == 1 and report.blocks[0].merged, str(report)


def test_perturbation_moves_every_value() -> None:
    """Guard: the helper really changes every parameter and running statistic of both models."""
    model = _at_initialisation(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), 0, zero_biases=True)
    other = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _perturb([model, other], seed=0)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert not torch.equal(v, before[k]), k
            assert torch.equal(v, other.state_dict()[k]), k
    assert math.isfinite(float(model[1].running_var.min())) and float(model[1].running_var.min()) > 0
