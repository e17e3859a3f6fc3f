"""Models whose forward branches on ``self.training`` beyond BatchNorm and dropout.

torchvision's GoogLeNet returns ``GoogLeNetOutputs(logits, aux2, aux1)`` in train mode and the logits
alone in eval mode. The FX front end traced every model in train mode, so ``merge`` returned three
outputs where ``model.eval()`` returns one, and ``prepare``'s model kept the auxiliary heads in eval mode.
Oracle: the model's own eval-mode forward, in float64.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import repq_fx
from repq_fx.errors import TrainingBranchWarning

REL_TOL = 1e-9
FRONT_ENDS = ("fx", "export")


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape, (type(got), getattr(got, "shape", None))
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _with_running_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial BN running statistics (a freshly built model has 0 and 1)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


class AuxHeadNet(nn.Module):
    """Conv-BN blocks with an auxiliary head computed only ``if self.training`` (GoogLeNet's habit)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor):
        y = self.stem(x)
        aux = self.aux(y).mean((2, 3)) if self.training else None
        logits = self.head(self.body(y).mean((2, 3)))
        if self.training:
            return logits, aux
        return logits


def _aux_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    return _with_running_stats(AuxHeadNet().double(), x), x


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_merge_of_a_training_branch_equals_model_eval(front_end: str) -> None:
    model, x = _aux_net()
    merged = repq_fx.merge(model, example_inputs=(x,), capture=front_end)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
    assert not model.training
    report = repq_fx.explain(model.train(), example_inputs=(x,), capture=front_end)
    assert "aux" not in " ".join(b.name for b in report.merged), "explain described the train-only head"
    assert model.training, "explain must not switch the input model's mode"


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_prepare_of_a_training_branch_follows_model_eval_and_warns(front_end: str) -> None:
    model, x = _aux_net()
    with pytest.warns(TrainingBranchWarning, match=r"AuxHeadNet\.forward branches on self\.training.*\baux\b"):
        qmodel = repq_fx.prepare(model.train(), example_inputs=(x,), capture=front_end)
    repq_fx.disable_fake_quant(qmodel)
    with torch.no_grad():
        assert _rel_err(qmodel.eval()(x), model.eval()(x)) <= REL_TOL
        trained = qmodel.train()(x)
        logits, _ = model.train()(x)
    assert isinstance(trained, torch.Tensor), "the prepared model is one graph: model.eval()'s outputs"
    assert _rel_err(trained, logits) <= REL_TOL, "in train mode: the model's train-mode logits (batch statistics)"
    assert not any(name.startswith("aux.") for name, _ in qmodel.named_parameters())


def test_prepare_without_a_training_branch_does_not_warn() -> None:
    block = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.ReLU())

    class FunctionalDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.block(x), 0.2, self.training)

    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingBranchWarning)
        qmodel = repq_fx.prepare(FunctionalDropout())
    dropouts = [m for m in qmodel.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 2, "dropout (module and functional) is kept and follows the mode"


def test_googlenet_merge_equals_model_eval() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchvision's note on GoogLeNet's weight init
        model = torchvision.models.get_model("googlenet", weights=None).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model = _with_running_stats(model, x)
    merged = repq_fx.merge(model)
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
    with pytest.warns(TrainingBranchWarning, match=r"GoogLeNet\.forward.*aux"):
        qmodel = repq_fx.prepare(model.float())
    with torch.no_grad():
        assert isinstance(qmodel.eval()(x.float()), torch.Tensor)
