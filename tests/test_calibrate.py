"""What ``calibrate`` accepts as batches, and models with several inputs or outputs.

``calibrate`` called ``qmodel(batch[0])``: a model whose forward takes two tensors got a TypeError from
its own code. Each batch form has one documented rule (``repq_fx.batches``): a Tensor is the input, a
dict gives keyword inputs, a tuple or list gives forward's required inputs first (the rest are
targets), and ``((inputs...), target)`` / ``({inputs}, target)`` pack them. The oracle for the
ranges is the original model's own forward: a min-max activation quantizer records exactly the range
of the tensor it sits on.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader, TensorDataset

import repq_fx
from repq_fx.errors import RepQError
from repq_fx.quant.fake_quant import ActFakeQuant
from quantized_models import calibrate_bn

MINMAX = repq_fx.QConfig(act_quantizer="minmax")


class TwoInputs(nn.Module):
    """``forward(rgb, depth, gain=1.0)``: two required inputs and an optional one."""

    def __init__(self) -> None:
        super().__init__()
        self.rgb = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depth = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        return self.head(self.rgb(rgb) + self.depth(depth) * gain)


def _ranges(qmodel: nn.Module) -> dict[str, tuple[float, float]]:
    return {n: (float(m.min_val), float(m.max_val)) for n, m in qmodel.named_modules() if isinstance(m, ActFakeQuant)}


def _hidden_range(model: TwoInputs, rgb: torch.Tensor, depth: torch.Tensor,
                  gain: float = 1.0) -> tuple[float, float]:
    """The range of the sum the head reads, from the original model (eval mode)."""
    with torch.no_grad():
        hidden = model.rgb(rgb) + model.depth(depth) * gain
    return float(hidden.min()), float(hidden.max())


@pytest.fixture(scope="module")
def two_inputs() -> tuple[TwoInputs, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TwoInputs().eval()
    return model, torch.randn(4, 3, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("form", ["tuple", "tuple+target", "list+target", "dict", "packed-tuple", "packed-dict",
                                  "dataloader"])
def test_two_input_model_calibrates_from_every_batch_form(two_inputs, form: str) -> None:
    model, rgb, depth, target = two_inputs
    batch = {"tuple": (rgb, depth), "tuple+target": (rgb, depth, target), "list+target": [rgb, depth, target],
             "dict": {"rgb": rgb, "depth": depth}, "packed-tuple": ((rgb, depth), target),
             "packed-dict": ({"rgb": rgb, "depth": depth}, target)}.get(form)
    batches = DataLoader(TensorDataset(rgb, depth, target), batch_size=4) if form == "dataloader" else [batch]
    qmodel = repq_fx.prepare(model, MINMAX)
    assert repq_fx.calibrate(qmodel, batches) == 1
    lo, hi = _hidden_range(model, rgb, depth)
    head_input = qmodel.get_submodule("add_fake_quant")  # the quantizer on the sum the head reads
    assert abs(float(head_input.min_val) - lo) <= 1e-6 * abs(lo)
    assert abs(float(head_input.max_val) - hi) <= 1e-6 * abs(hi)


def test_every_form_of_one_batch_gives_the_same_quantizers(two_inputs) -> None:
    model, rgb, depth, target = two_inputs
    states = []
    for batch in [(rgb, depth), {"rgb": rgb, "depth": depth}, ((rgb, depth), target), (rgb, depth, target)]:
        qmodel = repq_fx.prepare(model)
        repq_fx.calibrate(qmodel, [batch])
        states.append(qmodel.state_dict())
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)


def test_optional_input_is_given_by_keyword(two_inputs) -> None:
    model, rgb, depth, target = two_inputs
    qmodel = repq_fx.prepare(model, MINMAX)
    repq_fx.calibrate(qmodel, [{"rgb": rgb, "depth": depth, "gain": 0.0}])
    lo, hi = _hidden_range(model, rgb, depth, gain=0.0)
    assert abs(float(qmodel.get_submodule("add_fake_quant").max_val) - hi) <= 1e-6 * abs(hi)


def test_one_input_model_from_a_dataloader_of_pairs() -> None:
    """``(input, target)`` from a DataLoader: the target is not an input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x, y = torch.randn(8, 3, 6, 6), torch.arange(8)
    qmodel = repq_fx.prepare(model, MINMAX)
    assert repq_fx.calibrate(qmodel, DataLoader(TensorDataset(x, y), batch_size=4)) == 2
    with torch.no_grad():
        hidden = model[1](model[0](x))
    assert abs(float(qmodel.get_submodule("output_fake_quant").max_val) / float(hidden.max()) - 1) <= 1e-6


@pytest.mark.parametrize("batch, message", [
    (lambda rgb, depth: rgb, r"a batch is a Tensor of shape \[4, 3, 8, 8\], but TwoInputs.forward\(rgb, depth, "
                             r"gain=1.0\) needs 2 inputs: give each batch as a tuple \(rgb, depth\)"),
    (lambda rgb, depth: (rgb,), r"a batch is a tuple of 1 items \(Tensor of shape \[4, 3, 8, 8\]\), but "
                                r"TwoInputs.forward\(rgb, depth, gain=1.0\) needs 2 inputs"),
    (lambda rgb, depth: ((rgb,), 0), r"whose inputs are a tuple of 1 items"),
    (lambda rgb, depth: {"rgb": rgb, "depht": depth}, r"takes no 'depht'"),
    (lambda rgb, depth: {"rgb": rgb}, r"also needs 'depth'"),
    (lambda rgb, depth: "rgb.png", r"a batch is a str; TwoInputs.forward\(rgb, depth, gain=1.0\) takes a tuple of "
                                   r"2 inputs"),
])
def test_a_batch_that_fits_no_rule_is_refused_naming_what_forward_takes(two_inputs, batch, message) -> None:
    model, rgb, depth, _ = two_inputs
    qmodel = repq_fx.prepare(model)
    with pytest.raises(RepQError, match=message):
        repq_fx.calibrate(qmodel, [batch(rgb, depth)])


# ----------------------------------------------------------------------------- several outputs

class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.cls = nn.Conv2d(8, 4, 1)
        self.box = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        return {"logits": self.cls(features).mean((2, 3)), "boxes": self.box(features)}


class TupleOut(DictOut):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out = super().forward(x)
        return out["logits"], out["boxes"]


class TwoInTwoOut(TwoInputs):
    def forward(self, rgb: torch.Tensor, depth: torch.Tensor, gain: float = 1.0):  # type: ignore[override]
        both = super().forward(rgb, depth, gain)
        return {"a": both[:, :2], "b": (both[:, 2:], self.rgb(rgb))}


def _leaves(out) -> list[torch.Tensor]:
    return list(torch.utils._pytree.tree_leaves(out))


@pytest.mark.parametrize("build, inputs", [
    (DictOut, lambda: (torch.randn(8, 3, 8, 8),)),
    (TupleOut, lambda: (torch.randn(8, 3, 8, 8),)),
    (TwoInTwoOut, lambda: (torch.randn(8, 3, 8, 8), torch.randn(8, 1, 8, 8))),
], ids=["dict", "tuple", "two-in-nested-out"])
def test_several_outputs_through_prepare_calibrate_train_lower(build, inputs) -> None:
    torch.manual_seed(0)
    x = inputs()
    model = calibrate_bn(build(), tuple(x[0].shape)) if len(x) == 1 else build().eval()
    qmodel = repq_fx.prepare(model).train()
    repq_fx.calibrate(qmodel, [x, x])
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        out = qmodel(*x)
        assert type(out) is type(model(*x))
        sum(t.square().mean() for t in _leaves(out)).backward()
        optimizer.step()
    qmodel.eval()
    lowered = repq_fx.lower(qmodel)
    with torch.no_grad():
        expected, actual = qmodel(*x), lowered(*x)
    assert torch.utils._pytree.tree_structure(actual) == torch.utils._pytree.tree_structure(expected)
    for e, a in zip(_leaves(expected), _leaves(actual)):
        # at most one step of the quantizer the output leaves through (bounded by the largest step)
        step = max(float(m.scale.detach()) for m in qmodel.modules() if isinstance(m, ActFakeQuant))
        assert (e - a).abs().max().item() <= step * 1.001


# ----------------------------------------------------------------------------- property

@settings(max_examples=40, deadline=None)
@given(inputs=st.integers(1, 3), optional=st.booleans(), form=st.sampled_from(["exact", "targets", "packed", "dict"]),
       targets=st.integers(1, 2))
def test_batch_rules_pass_exactly_the_inputs(inputs: int, optional: bool, form: str, targets: int) -> None:
    """For a forward of ``inputs`` required tensors (and maybe an optional one), every documented form
    of a batch passes exactly those tensors, by position or by name, and never a target."""
    from repq_fx.batches import forward_inputs

    names = [f"x{i}" for i in range(inputs)]
    params = ", ".join(names + (["extra=None"] if optional else []))
    namespace: dict = {}
    exec(f"def forward(self, {params}):\n    return None", namespace)
    model = type("Model", (nn.Module,), {"forward": namespace["forward"]})()
    values = [torch.full((1,), float(i)) for i in range(inputs)]
    labels = [torch.full((1,), -1.0 - i) for i in range(targets)]
    batch = {"exact": lambda: tuple(values), "targets": lambda: (*values, *labels),
             "packed": lambda: (tuple(values), *labels), "dict": lambda: dict(zip(names, values))}[form]()
    if form == "exact" and inputs == 1:
        batch = values[0]
    args, kwargs = forward_inputs(model, batch)
    passed = list(args) + [kwargs[n] for n in names if n in kwargs]
    assert len(passed) == inputs and all(p is v for p, v in zip(passed, values))
    assert not any(p is label for p in list(args) + list(kwargs.values()) for label in labels)
