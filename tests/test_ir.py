"""The canonical op set as code (repq_fx.ir): views, records, the rule-table engine, and the report reading them."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repq_fx
from repq_fx.capture import capture
from repq_fx.algebra import ops
from repq_fx.errors import RegistrationError
from repq_fx.ir import (ERASED, KEEP, AvgPoolView, ConvView, PadView, RuleTable, apply, free_module_path, record_of)
from repq_fx.ir.records import RECORDS
from repq_fx.patterns.linear_ops import RULES, LinearOp


@pytest.fixture
def restore_registries():
    """Registrations a test makes (rules and records of torch functions) are undone after it."""
    saved = {table: dict(table._functions) for table in (RULES, RECORDS)}
    yield
    for table, functions in saved.items():
        table._functions.clear()
        table._functions.update(functions)


class _ConvThenNegative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.negative(self.conv(x)).relu()


def test_an_op_registered_through_register_op_is_named_by_its_function_not_shift(restore_registries) -> None:
    # regression: report.op_name's if-ladder labelled every op it did not list "shift" (conv3x3 -> shift)
    @repq_fx.register_op(torch.negative)
    def _negative(node, tensors):
        return LinearOp(node, "unary", (node.args[0],),
                        lambda values, channels, before: ops.diagonal(-torch.ones(channels, dtype=values.dtype), None))

    report = repq_fx.explain(_ConvThenNegative(), torch.randn(1, 3, 8, 8))
    assert [b.branches for b in report.blocks] == ["conv3x3 -> negative"]
    assert report.blocks[0].merged


def test_register_op_label_names_the_op_in_explain(restore_registries) -> None:
    @repq_fx.register_op(torch.negative, label="flip")
    def _negative(node, tensors):
        return LinearOp(node, "unary", (node.args[0],),
                        lambda values, channels, before: ops.diagonal(-torch.ones(channels, dtype=values.dtype), None))

    assert repq_fx.explain(_ConvThenNegative(), torch.randn(1, 3, 8, 8)).blocks[0].branches == "conv3x3 -> flip"


def test_register_op_refuses_what_no_table_can_key_on() -> None:
    with pytest.raises(RegistrationError, match="got 3"):
        repq_fx.register_op(3)
    # regression: accepted, then never matched (only call_function rules are consulted) or crashed in explain
    for targets in [("negative",), (nn.Hardtanh,), (nn.Identity(),), ()]:
        with pytest.raises(RegistrationError, match="call_function targets"):
            repq_fx.register_op(*targets)
    with pytest.raises(RegistrationError, match="decorates a rule"):
        repq_fx.register_op(torch.negative)(42)
    with pytest.raises(RegistrationError, match="label"):
        repq_fx.register_op(torch.negative, label=3)


def test_views_bind_keywords_and_defaults_by_name() -> None:
    gm = fx.symbolic_trace(lambda x, w: F.conv2d(x, w, stride=2, groups=4))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    view = ConvView.of(node)
    assert (view.x.name, view.weight.name, view.bias) == ("x", "w", None)
    assert (view.stride, view.padding, view.dilation, view.groups) == (2, 0, 1, 4)
    assert not ConvView.is_canonical(node)
    assert AvgPoolView.names() == ("x", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                   "divisor_override")
    pad = fx.symbolic_trace(lambda x: F.pad(x, (1, 1), value=2.0))
    assert PadView.of(next(n for n in pad.graph.nodes if n.op == "call_function")).args()[1:] == ((1, 1), "constant",
                                                                                                     2.0)


def test_every_canonical_op_has_a_record_with_its_view() -> None:
    from repq_fx.ir import batch_norm

    expected = {F.conv2d: "conv", batch_norm: "bn", F.avg_pool2d: "avg_pool", F.pad: "pad", operator.getitem: "crop",
                operator.mul: "scale", operator.truediv: "scale", operator.neg: "scale", operator.add: "shift",
                operator.sub: "shift", torch.cat: "cat"}
    for target, name in expected.items():
        record = RECORDS.for_function(target)
        assert record is not None and record.name == name and record.view is not None, target


def test_records_label_every_canonical_op_as_explain_did() -> None:
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, stride=2, dilation=2, groups=2)
            self.bn = nn.BatchNorm2d(8)
            self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))

        def forward(self, x):
            y = F.pad(x, (1, 1, 1, 1), value=0.5)
            y = F.avg_pool2d(self.bn(self.conv(y)), 3, 1, 1)
            return (y[:, :, 1:-1, 1:-1] * 2 + self.shift).relu()

    gm = capture(Chain(), (torch.randn(1, 4, 16, 16),), front_end="fx", mode="eval")
    labels = [record_of(n, gm).label(gm, n) for n in gm.graph.nodes if n.op == "call_function" and record_of(n, gm)]
    assert labels == ["pad(0.5)", "conv3x3/s2/d2/g2", "bn", "avgpool3", "crop", "scale", "shift"]


def test_rule_table_looks_up_module_classes_methods_functions_and_aten_ops() -> None:
    table: RuleTable[str] = RuleTable("test rule")
    table.register(nn.modules.conv._ConvNd)("conv")
    table.register("add_", operator.add)("add")
    table.register(torch.ops.aten.mean)("mean, every overload")
    table.register(torch.ops.aten.mean.dim)("mean.dim")
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 1, 1)))
    assert table.lookup(next(n for n in gm.graph.nodes if n.op == "call_module"), gm) == "conv"
    assert table.for_module(nn.ReLU()) is None
    traced = fx.symbolic_trace(lambda x: (x + 1).add_(2))
    assert [table.lookup(n) for n in traced.graph.nodes] == [None, "add", "add", None]
    assert table.for_function(torch.ops.aten.mean.dim) == "mean.dim"
    assert table.for_function(torch.ops.aten.mean.default) == "mean, every overload"
    assert table.for_function([]) is None  # an unhashable target has no rule
    with pytest.raises(RegistrationError):
        table.register(int)


def test_apply_carries_out_the_sentinels() -> None:
    gm = fx.symbolic_trace(lambda x: x.relu().neg())
    relu, neg = [n for n in gm.graph.nodes if n.op == "call_method"]
    assert not apply(relu, KEEP) and not apply(relu, ERASED) and not apply(relu, relu)
    assert apply(neg, relu)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_method", "output"]


def test_free_module_path_counts_up_from_the_name() -> None:
    root = nn.Module()
    root.block = nn.Module()
    assert free_module_path(root, "block.reparam_conv") == "block.reparam_conv"
    root.block.reparam_conv = nn.Identity()
    assert free_module_path(root, "block.reparam_conv") == "block.reparam_conv_1"
    root.block.reparam_conv_1 = nn.Identity()
    assert free_module_path(root, "block.reparam_conv") == "block.reparam_conv_2"
    assert free_module_path(root, "missing.reparam_conv") == "missing.reparam_conv"
    assert free_module_path(root, "block") == "block_1"


def test_a_saved_graph_keeps_the_canonical_batch_norm_when_loaded(tmp_path) -> None:
    # torch.load re-traces a GraphModule's code; the tracer must keep repq_fx.ir's own functions calls, or
    # tracing into batch_norm fails on its train/eval branch (it did once batch_norm moved to repq_fx.ir)
    from repq_fx.ir import batch_norm

    merged = repq_fx.merge(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)).eval())  # a lone BN: nothing to fold into
    torch.save(merged, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    assert [n.target for n in back.graph.nodes if n.op == "call_function"].count(batch_norm) == 1
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(back(x), merged(x))
    back.train()(x)  # follows train mode: batch statistics, running statistics updated
    assert not torch.equal(back.get_submodule("1").running_mean, merged.get_submodule("1").running_mean)


class _ReflectPadThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(F.pad(x, (1, 1, 1, 1), mode="reflect")) + self.b(x)


def test_relabelling_a_known_op_keeps_its_refusal(restore_registries) -> None:
    """Regression: register_op(F.pad, label=...) replaced pad's whole record, so explain lost why a reflect pad
    stays out of the block."""
    before = repq_fx.explain(_ReflectPadThenConv())
    assert "reflect" in str(before)
    repq_fx.register_op(F.pad, label="zeropad")(RULES.for_function(F.pad))
    after = repq_fx.explain(_ReflectPadThenConv())
    assert str(after) == str(before)  # its label shows only where a pad is merged; the refusal stays
