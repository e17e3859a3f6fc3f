"""Quantizers whose calibration data is all zeros (zero-initialised BN gamma, layer scale).

timm's resnet18d, regnetx_002, convnext_atto, repvit_m0_9, fastvit_t8 and mobilevit_xs start with
residual branches whose output is exactly zero (``zero_init_last``) or nearly so (layer scale). The
learned steps of the quantizers reading them were silently set to an epsilon: once SGD moved the
gamma, every value lay far outside the grid, no gradient reached the gamma through the clipped
straight-through estimator and the quantizer never represented anything but zero.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import repq_fx
from repq_fx.errors import ZeroRangeWarning
from repq_fx.quant.fake_quant import STEP_FLOOR, ActFakeQuant, WeightFakeQuant
from repq_fx.quant.zero_range import fill_steps

C = 8


class ZeroInitResidual(nn.Module):
    """A residual block whose last BN gamma starts at zero, and a 1x1 conv that reads the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.conv2, self.bn2 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.read = nn.Conv2d(C, C, 1)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(x + branch) + self.read(branch)


def _zero_input_quantizers(qmodel: nn.Module, x: torch.Tensor) -> dict[type, nn.Module]:
    """The fake quantizers whose input is identically zero in a forward of ``x``, by class (one each here)."""
    seen: dict[type, list[nn.Module]] = {}
    hooks = [q.register_forward_pre_hook(lambda m, i: seen.setdefault(type(m), []).append(m)
                                         if not bool(i[0].any()) else None)
             for q in qmodel.modules() if isinstance(q, (WeightFakeQuant, ActFakeQuant))]
    with torch.no_grad():
        qmodel(x)
    for h in hooks:
        h.remove()
    assert {k: len(v) for k, v in seen.items()} == {WeightFakeQuant: 1, ActFakeQuant: 1}, seen
    return {k: v[0] for k, v in seen.items()}


def _calibrated() -> tuple[nn.Module, torch.Tensor, list[warnings.WarningMessage], nn.Module, nn.Module]:
    torch.manual_seed(0)
    qmodel = repq_fx.prepare(ZeroInitResidual().train(), repq_fx.QConfig(weight_bits=4, act_bits=8))
    x = torch.randn(8, C, 12, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        repq_fx.calibrate(qmodel, [x, torch.randn(8, C, 12, 12)])
    zero = _zero_input_quantizers(qmodel, x)
    return (qmodel, x, [w for w in caught if issubclass(w.category, ZeroRangeWarning)], zero[WeightFakeQuant],
            zero[ActFakeQuant])


def test_calibration_on_zeros_warns_naming_the_quantizers() -> None:
    qmodel, _, caught, weight, act = _calibrated()
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert weight.path in message and act.path in message and "2 quantizers" in message
    for q in (weight, act):
        assert bool((q.scale > 1e3 * STEP_FLOOR).all()), (q.path, q.scale)


def _quantizer_io(qmodel: nn.Module, x: torch.Tensor, quantizers: dict[str, nn.Module]) -> dict[str, tuple]:
    seen: dict[str, tuple] = {}
    hooks = [q.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, (i[0].detach(), o.detach())))
             for k, q in quantizers.items()]
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_zero_gamma_learns_through_the_quantizers_after_sgd() -> None:
    """Once an SGD step moves the zeroed gamma, both quantizers represent the now nonzero values (a step
    fitted to the first data with a range), and the gamma keeps receiving gradient through them."""
    qmodel, x, _, weight, act = _calibrated()
    gamma = dict(qmodel.named_parameters())["bn2.weight"]
    opt = torch.optim.SGD([p for n, p in qmodel.named_parameters() if not n.endswith("fake_quant.scale")], lr=0.05)
    target = torch.randn_like(qmodel(x))
    grads = []
    for step in range(4):
        opt.zero_grad()
        F.mse_loss(qmodel(x), target).backward()
        grads.append(float(gamma.grad.abs().max()))
        opt.step()
        if step == 0:
            assert float(gamma.detach().abs().max()) > 0
            for name, (value, quantized) in _quantizer_io(qmodel, x, {"weight": weight, "act": act}).items():
                assert bool(value.abs().amax() > 0), name
                rel = float((quantized - value).abs().amax() / value.abs().amax())
                assert rel < 0.5, f"{name} quantizer does not represent its now nonzero input (rel err {rel:.3g})"
    assert all(g > 0 for g in grads), grads


def test_lower_after_zero_range_has_no_step_at_the_floor() -> None:
    qmodel, x, _, _, _ = _calibrated()
    with warnings.catch_warnings():
        warnings.simplefilter("error", repq_fx.errors.StepCollapsedWarning)
        lowered = repq_fx.lower(qmodel)
    with torch.no_grad():
        assert torch.isfinite(lowered(x)).all()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1e-38, 1e-9, 0.01, 0.02, 0.5, 3.0]), min_size=1, max_size=12))
def test_fill_steps_keeps_good_steps_and_fills_the_rest_from_them(values: list[float]) -> None:
    steps = torch.tensor(values)
    filled, count = fill_steps(steps, STEP_FLOOR, default=0.25)
    good = steps >= STEP_FLOOR
    assert count == int((~good).sum())
    assert torch.equal(filled[good], steps[good])
    assert bool((filled >= STEP_FLOOR).all())
    if good.any():
        low, high = steps[good].min(), steps[good].max()
        assert bool(((filled[~good] >= low) & (filled[~good] <= high)).all())
    else:
        assert bool((filled == 0.25).all())


@pytest.mark.parametrize("learned", [True, False])
def test_first_batch_of_zeros_without_calibrate(learned: bool) -> None:
    """The first forward initialises the step (no calibrate): learned steps get the unit step and a warning;
    min-max steps follow the data at every call and keep torch.ao's behaviour (no warning)."""
    q = ActFakeQuant(bits=8, learned=learned)
    q.path = "head.act_fake_quant"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q(torch.zeros(4, 3))
    zero_range = [w for w in caught if issubclass(w.category, ZeroRangeWarning)]
    if learned:
        assert len(zero_range) == 1 and "head.act_fake_quant" in str(zero_range[0].message)
        assert float(q.scale) == pytest.approx(1 / 255) and int(q.zero_point) == 128
    else:
        assert not zero_range
