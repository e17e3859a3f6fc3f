"""The typed contract between ``prepare``, the BN statistics and ``lower``.

- A prepared graph calls ``branch_statistics(x, Branch, bn, BnMode, moments)``: its generated code
  names ``Branch`` and ``BnMode``, and the prepared model deep-copies, pickles and round-trips
  ``torch.save`` with them (same outputs, still trains, ``lower`` still folds it; after pickling,
  FX's tracer constructs each ``Branch`` in a node of its own, as it does any NamedTuple argument).
- ``Branch`` has ``AffineConv``'s fields, in its order; ``BnMode`` takes the strings ``QConfig`` takes.
- The algebra decides on a symbolic value's number through ``decisions.concrete`` (``passes.emit``
  registers ``Sym``), and the library's bad-argument errors are ``RepQError`` s that stay ``ValueError`` s.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import pickle

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import repq_fx
from repq_fx.algebra import AffineConv
from repq_fx.algebra.decisions import concrete
from repq_fx.config import BN_MODES, BnMode, QConfig
from repq_fx.errors import ConfigError, RepQError
from repq_fx.passes.bn_graph import StatisticsCall
from repq_fx.passes.emit import Emitter
from repq_fx.quant.bn_stats import Branch, block_statistics, branch_statistics


class _Block(nn.Module):
    """RepVGG: 3x3 conv + BN, 1x1 conv + BN and (same shape) an identity BN, summed, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.pointwise = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.pointwise(x)
        return torch.relu(y if self.identity is None else y + self.identity(x))


def _prepared(mode: str) -> fx.GraphModule:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(4, 4), _Block(4, 8, stride=2))
    qmodel = repq_fx.prepare(model, QConfig(bn_mode=mode))
    repq_fx.calibrate(qmodel, [torch.randn(2, 4, 8, 8)])
    return qmodel


def _round_trips(qmodel: fx.GraphModule) -> list[nn.Module]:
    buffer = io.BytesIO()
    torch.save(qmodel, buffer)
    buffer.seek(0)
    return [copy.deepcopy(qmodel), pickle.loads(pickle.dumps(qmodel)), torch.load(buffer, weights_only=False)]


@pytest.mark.parametrize("mode", BN_MODES)
def test_prepared_graph_calls_statistics_with_typed_arguments(mode: str) -> None:
    qmodel = _prepared(mode)
    calls = [StatisticsCall.of(n) for n in qmodel.graph.nodes if n.target is branch_statistics]
    assert len(calls) == 5 and all(isinstance(c.branch, Branch) and c.mode is BnMode(mode) for c in calls)
    assert "Branch(" in qmodel.code and f"BnMode.{BnMode(mode).name}" in qmodel.code
    shared = [n for n in qmodel.graph.nodes if n.target is block_statistics]
    assert len(shared) == (0 if mode == "running" else 2)  # one per block input, both blocks
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = qmodel.eval()(x)
    clones = _round_trips(qmodel)
    assert clones[0].code == qmodel.code  # a deep copy keeps the graph as it is
    for clone in clones:
        # pickle re-traces the code, and FX's tracer builds a NamedTuple argument in a node of its own
        branches = [StatisticsCall.of(n).branch for n in clone.graph.nodes if n.target is branch_statistics]
        assert all(isinstance(b, Branch) or b.target is Branch for b in branches) and len(branches) == 5
        with torch.no_grad():
            assert torch.equal(clone.eval()(x), expected)
        clone.train()(x).square().sum().backward()
        assert all(p.grad is not None for n, p in clone.named_parameters() if n.startswith(("0.", "1.")))
        lowered = repq_fx.lower(clone.eval())
        assert lowered.lowered_layers == 2


def test_branch_follows_affine_conv_and_modes_take_strings() -> None:
    assert Branch._fields == tuple(f.name for f in dataclasses.fields(AffineConv))
    conv = AffineConv(torch.ones(2, 1, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 2)
    assert Branch.of(conv).affine() == conv
    assert BN_MODES == ("batch", "estimate", "running") and all(BnMode(m) == m for m in BN_MODES)
    assert QConfig(bn_mode=BnMode.ESTIMATE) == QConfig(bn_mode="estimate")
    with pytest.raises(AssertionError, match="unknown bn_mode"):
        branch_statistics(torch.randn(1, 2, 3, 3), Branch.of(None), nn.BatchNorm2d(2), "sometimes")


def test_algebra_reads_symbolic_numbers_through_concrete() -> None:
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    sym = Emitter(gm).wrap(gm.graph.placeholder("w"), torch.arange(3.0))
    assert torch.equal(concrete(sym), torch.arange(3.0))
    assert concrete(4) == 4


def test_library_bad_arguments_are_repq_errors_and_value_errors() -> None:
    from repq_fx.quant.fake_quant import WeightFakeQuant
    from repq_fx.quant.lowered import QuantizeDequantize

    with pytest.raises(ConfigError, match="init must be one of"):
        WeightFakeQuant(bits=4, channels=2, init="max")
    qdq = QuantizeDequantize(scale=0.5, zero_point=3, quant_min=0, quant_max=255)
    with pytest.raises(ConfigError, match="container must be"):
        qdq.set_container("int4")
    with pytest.raises(ConfigError, match="either mode or options"):
        repq_fx.compile(nn.Linear(2, 2), mode="max-autotune", options={})
    assert issubclass(ConfigError, RepQError) and issubclass(ConfigError, ValueError)


def _in_the_layout_of_earlier_versions(qmodel: fx.GraphModule) -> fx.GraphModule:
    """The graph as versions before Branch wrote it: ``branch_statistics(x, *branch fields, bn, mode, moments)``,
    ``block_statistics`` over plain tuples, ``algebra.kernels.embed_add(..., inplace=True)``."""
    from repq_fx.algebra import kernels
    from repq_fx.quant import embed_add as trained_embed_add

    old = copy.deepcopy(qmodel)
    for node in old.graph.nodes:
        if node.target is branch_statistics:
            call = StatisticsCall.of(node)
            node.args, node.kwargs = (call.x, *call.branch, call.bn, str(call.mode), call.moments), {}
        elif node.target is block_statistics:
            node.args = (node.args[0], tuple(tuple(b) for b in node.args[1]), *node.args[2:])
        elif node.target is trained_embed_add.embed_add:
            node.target, node.kwargs = kernels.embed_add, {**node.kwargs, "inplace": True}
    old.recompile()
    return old


@pytest.mark.parametrize("mode", ["batch", "estimate"])
def test_prepared_models_saved_by_earlier_versions_still_run_and_lower(mode: str) -> None:
    """Regression: a prepared model torch.save'd before Branch existed failed to run (TypeError: 11 arguments)."""
    qmodel = _prepared(mode)
    buffer = io.BytesIO()
    torch.save(_in_the_layout_of_earlier_versions(qmodel), buffer)
    buffer.seek(0)
    old = torch.load(buffer, weights_only=False)
    assert "inplace = True" in old.code and "Branch(" not in old.code
    x = torch.randn(2, 4, 8, 8)
    for train in (False, True):  # eval first: a train-mode forward updates the running statistics
        with torch.no_grad():
            assert torch.equal(old.train(train)(x), qmodel.train(train)(x))
    with torch.no_grad():
        assert torch.equal(repq_fx.lower(old.eval())(x), repq_fx.lower(qmodel.eval())(x))
