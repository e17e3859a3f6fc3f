"""In-place ops on the output of a quantized conv.

``ReLU6/Hardswish/SiLU(inplace=True)`` after a conv (+BN) is how torchvision and timm write their
mobile networks. The activation quantizer that ``prepare`` puts on the conv's output used to save
that output for its backward, so the first ``backward()`` raised "one of the variables needed for
gradient computation has been modified by an inplace operation ... output 0 of _LearnedFakeQuant".
A conv or a BatchNorm does not need its output for backward, and neither may the quantizer.

- the real models named in the issue: prepare -> calibrate -> two SGD steps in train mode;
- a property over in-place activation kinds after a quantized conv: training runs, and the
  gradients equal those of the same network with the activation written out of place (up to
  PyTorch's own float rounding between the two forms).
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import repq_fx


def _two_sgd_steps(qmodel: nn.Module, x: torch.Tensor) -> list[float]:
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
    qmodel.train()
    losses = []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss = qmodel(x).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torchvision = pytest.importorskip("torchvision")
        return getattr(torchvision.models, name)(weights=None)
    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False)
    return build


@pytest.mark.parametrize("build", [_torchvision("mobilenet_v2"), _torchvision("mobilenet_v3_small"),
                                   _torchvision("efficientnet_b0"), _timm("efficientnet_b0"),
                                   _timm("mobilevit_xs")],
                         ids=["tv-mobilenet_v2", "tv-mobilenet_v3_small", "tv-efficientnet_b0",
                              "timm-efficientnet_b0", "timm-mobilevit_xs"])
def test_real_models_with_inplace_activations_train(build: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    model = build()
    inplace = [m for m in model.modules() if getattr(m, "inplace", False)]
    assert inplace, "the model no longer has in-place activations: this test checks nothing"
    qmodel = repq_fx.prepare(model)
    x = torch.randn(2, 3, 64, 64)
    repq_fx.calibrate(qmodel, [x])
    losses = _two_sgd_steps(qmodel, x)
    assert all(torch.isfinite(torch.tensor(losses)))
    missing = [n for n, p in qmodel.named_parameters() if p.grad is None]
    assert not missing
    first = next(p for n, p in qmodel.named_parameters() if p.dim() == 4)  # the stem conv's weight
    assert bool(first.grad.abs().max() > 0)  # the gradient went back through every quantized layer


# ----------------------------------------------------------------------------- property

MODULES: dict[str, Callable[[bool], nn.Module]] = {
    "ReLU": lambda inplace: nn.ReLU(inplace), "ReLU6": lambda inplace: nn.ReLU6(inplace),
    "Hardswish": lambda inplace: nn.Hardswish(inplace), "SiLU": lambda inplace: nn.SiLU(inplace),
    "LeakyReLU": lambda inplace: nn.LeakyReLU(0.1, inplace), "ELU": lambda inplace: nn.ELU(inplace=inplace),
    "Hardtanh": lambda inplace: nn.Hardtanh(-1.0, 1.0, inplace),
    "Hardsigmoid": lambda inplace: nn.Hardsigmoid(inplace), "Mish": lambda inplace: nn.Mish(inplace),
    "CELU": lambda inplace: nn.CELU(inplace=inplace),
}
FUNCTIONS = ("F.relu", "relu_", "clamp_", "iadd")  # the functional and method forms of the issue
KINDS = tuple(MODULES) + FUNCTIONS


class ConvThenInplace(nn.Module):
    """conv (+BN) -> an activation (in place or not, on the tensor or on a view of it) -> conv: the
    quantized conv's output is what the activation modifies."""

    def __init__(self, kind: str, inplace: bool, channels: int, kernel: int, bn: bool, view: bool) -> None:
        super().__init__()
        self.kind, self.inplace, self.view = kind, inplace, view
        self.conv = nn.Conv2d(3, channels, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(channels) if bn else nn.Identity()
        self.act = MODULES[kind](inplace) if kind in MODULES else nn.Identity()
        self.side = nn.Conv2d(3, channels, 1)
        self.head = nn.Conv2d(channels, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.view:  # an in-place op on a view changes the quantizer's output too
            y = y.view(y.shape)
        y = self.act(y)
        if self.kind == "F.relu":
            y = F.relu(y, inplace=self.inplace)
        elif self.kind == "relu_":
            y = y.relu_() if self.inplace else y.relu()
        elif self.kind == "clamp_":
            y = y.clamp_(-0.5, 0.5) if self.inplace else y.clamp(-0.5, 0.5)
        elif self.kind == "iadd":
            if self.inplace:
                y += self.side(x)
            else:
                y = y + self.side(x)
        return self.head(y)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(KINDS), channels=st.integers(2, 6), kernel=st.sampled_from([1, 3]),
       bn=st.booleans(), view=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_inplace_op_after_a_quantized_conv_trains_like_out_of_place(kind: str, channels: int, kernel: int,
                                                                    bn: bool, view: bool, seed: int) -> None:
    torch.manual_seed(seed)
    reference = ConvThenInplace(kind, False, channels, kernel, bn, view)
    inplace = copy.deepcopy(reference)
    inplace.inplace = True
    for module in inplace.modules():
        if hasattr(module, "inplace"):
            module.inplace = True
    x = torch.randn(4, 3, 6, 6)
    grads = []
    for model in (inplace, reference):
        qmodel = repq_fx.prepare(model)
        repq_fx.calibrate(qmodel, [x])
        qmodel.train()
        qmodel(x).square().mean().backward()
        # quantizer names follow node names (relu_ / relu), so compare in order
        grads.append([(n if "fake_quant" not in n else "quantizer", p.grad) for n, p in qmodel.named_parameters()])
    assert [n for n, _ in grads[0]] == [n for n, _ in grads[1]]
    assert all(g is not None for _, g in grads[0] + grads[1])
    # PyTorch's in-place and out-of-place backward formulas may round differently (elu_ uses its
    # result, elu its input); nothing else differs and no rounding decision depends on it. Relative to
    # the largest gradient: a bias before a BN has a gradient of float noise around zero.
    scale = max(g.abs().max().item() for _, g in grads[1])
    for (name, actual), (_, expected) in zip(*grads):
        assert (actual - expected).abs().max().item() <= 1e-5 * scale, name
