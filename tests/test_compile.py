"""torch.compile of prepared models: whole graphs, and the fake quantizers' flag mirrors.

The quantizers' ``enabled`` / ``initialized`` / ``observing`` flags are uint8 buffers (state_dict
state); ``bool(buffer)`` inside a compiled forward is a ``.item()`` and a graph break per quantizer
(a small RepVGGNet compiled as 28 graphs, timm repvgg_a0 as 71). Compiled code reads Python-bool
mirrors instead (Dynamo guards on them and recompiles when they change), so a prepared model
compiles as one graph. These tests check the graph count, that compiled models follow every way
the flags change (enable/disable, reset, calibrate, load_state_dict), and that the mirrors equal the
buffers after each of those. Agreement of a compiled model with eager (outputs, state, gradients)
is tests/test_prepare.py::test_torch_compile_matches_eager.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import repq_fx
from repq_fx.testing import blocks as B
from repq_fx.quant.fake_quant import ActFakeQuant, WeightFakeQuant, fake_quantizers

FLAGS = ("enabled", "initialized", "observing")


def _x(seed: int, batch: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 28, 28, generator=g) + 0.5


def _prepared(seed: int = 0, calibrated: bool = True, **config) -> nn.Module:
    torch.manual_seed(seed)
    net = B.RepVGGNet(widths=(8,), blocks_per_stage=2)
    qmodel = repq_fx.prepare(net, repq_fx.QConfig(**config))
    if calibrated:
        repq_fx.calibrate(qmodel, [_x(10), _x(11)])
    return qmodel


def _assert_mirrors(model: nn.Module) -> None:
    for q in fake_quantizers(model):
        for name in FLAGS:
            if hasattr(q, name):
                assert q._flags[name] == bool(getattr(q, name)), (name, q)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("config", [
    {"bn_mode": "batch"}, {"bn_mode": "estimate"}, {"bn_mode": "running"},
    {"bn_mode": "batch", "weight_quantizer": "minmax", "act_quantizer": "minmax"},
])
@pytest.mark.parametrize("train", [True, False])
def test_prepared_net_compiles_as_one_graph(config: dict, train: bool) -> None:
    qmodel = _prepared(**config).train(train)
    explained = torch._dynamo.explain(qmodel)(_x(1))
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count <= 2 and not reasons, (explained.graph_count, reasons)


def test_no_grad_forward_compiles_as_one_graph() -> None:
    """A validation loop (torch.no_grad, eval) broke once per block: the in-place branch sum
    (embed_add's mark_dirty) cannot be traced by Dynamo; compiled code now adds out of place."""
    qmodel = _prepared().eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(qmodel)(_x(1))
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1 and not reasons, (explained.graph_count, reasons)


@pytest.mark.parametrize("bn_mode", ["batch", "estimate"])
def test_fullgraph_train_step_matches_eager(bn_mode: str) -> None:
    # RepQ-BN and RepQ-BNEst training steps (gradients on) compile as one graph, fullgraph=True,
    # and give eager's outputs, gradients and updated state (BN running statistics).
    eager = _prepared(bn_mode=bn_mode).train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    r = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    for seed in (2, 3):  # the second call reuses the compiled graph
        x = _x(seed)
        got, expected = compiled(x), eager(x)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
        (got * r).sum().backward()
        (expected * r).sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6), name
    a, b = model.state_dict(), eager.state_dict()
    for k in b:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-7), k


def test_compiled_model_follows_flag_changes() -> None:
    # Each flag change (a new guard value) makes Dynamo recompile instead of reusing a graph traced
    # with the old value: a compiled model stays equal to eager through disable/enable and loading.
    eager = _prepared().train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    x = _x(2)

    def check() -> None:
        with torch.no_grad():
            assert torch.equal(compiled(x), eager(x))
        _assert_mirrors(model)

    check()
    for m in (model, eager):
        repq_fx.disable_fake_quant(m)
    check()
    for m in (model, eager):
        repq_fx.enable_fake_quant(m)
    check()
    # A checkpoint with fake quant off: load_state_dict updates the mirrors.
    off = copy.deepcopy(eager)
    repq_fx.disable_fake_quant(off)
    for m in (model, eager):
        m.load_state_dict(off.state_dict())
    assert not any(q._flags["enabled"] for q in fake_quantizers(model))
    check()


def test_calibrate_through_compiled_model() -> None:
    # calibrate() switches the observing flag; through a compiled model the observing graph runs,
    # then the initialising one, as in eager.
    # (min-max quantizers: Dynamo traces LSQ's MSE initialisation slowly, ~30 s here)
    eager = _prepared(calibrated=False, weight_quantizer="minmax", act_quantizer="minmax")
    model = copy.deepcopy(eager)
    batches = [_x(10), _x(11)]
    repq_fx.calibrate(eager, batches)
    repq_fx.calibrate(torch.compile(model, backend="aot_eager"), batches)
    _assert_mirrors(model)
    a, b = model.state_dict(), eager.state_dict()
    for k in b:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=0), k
    with torch.no_grad():
        assert torch.allclose(model.eval()(_x(3)), eager.eval()(_x(3)), rtol=1e-5, atol=1e-6)


def test_flag_mirrors_follow_every_change() -> None:
    qmodel = _prepared(calibrated=False)
    quantizers = fake_quantizers(qmodel)
    _assert_mirrors(qmodel)
    assert not any(q._flags["initialized"] for q in quantizers)
    repq_fx.calibrate(qmodel, [_x(10)])  # initialises, observing on then off
    _assert_mirrors(qmodel)
    assert all(q._flags["initialized"] for q in quantizers)
    assert not any(q._flags["observing"] for q in quantizers if isinstance(q, ActFakeQuant))
    repq_fx.disable_fake_quant(qmodel)
    _assert_mirrors(qmodel)
    saved = copy.deepcopy(qmodel.state_dict())
    for q in quantizers:
        q.enable()
        q.reset()
    _assert_mirrors(qmodel)
    qmodel.load_state_dict(saved)  # back to initialised, disabled
    _assert_mirrors(qmodel)
    assert all(q._flags["initialized"] and not q._flags["enabled"] for q in quantizers)
    for clone in (copy.deepcopy(qmodel), pickle.loads(pickle.dumps(qmodel))):
        _assert_mirrors(clone)
    buf = io.BytesIO()
    torch.save(qmodel, buf)
    buf.seek(0)
    _assert_mirrors(torch.load(buf, weights_only=False))


def test_module_pickled_without_mirrors_gets_them_from_buffers() -> None:
    q = WeightFakeQuant(bits=8, channels=2)
    q.enable(False)
    q(torch.randn(2, 3))
    state = q.__dict__.copy()
    del state["_flags"]  # as pickled before the mirrors existed
    old = WeightFakeQuant.__new__(WeightFakeQuant)
    old.__setstate__(state)
    assert old._flags == {"enabled": False, "initialized": True, "observing": False}


def test_activation_quantizer_pickled_before_mse_init_still_calibrates() -> None:
    q = ActFakeQuant(bits=8)
    state = q.__dict__.copy()
    del state["_flags"], state["_samples"], state["init"]  # as pickled before step_init existed
    old = ActFakeQuant.__new__(ActFakeQuant)
    old.__setstate__(state)
    assert old.init == "minmax"
    old.reset()
    old.set_observing(True)
    old(torch.tensor([0.0, 2.55]))
    old.set_observing(False)
    old.init_from_range()
    assert float(old.scale) == pytest.approx(0.01)


def test_minmax_average_starts_from_the_first_range() -> None:
    # The moving average of a min-max activation quantizer is branch-free (torch.compile); with no
    # range recorded yet it takes the batch's range, then moves towards new ones.
    q = ActFakeQuant(bits=8, learned=False, averaging_constant=0.5)
    q.observe(torch.tensor([-1.0, 3.0]), average=True)
    assert (q.min_val.item(), q.max_val.item()) == (-1.0, 3.0)
    q.observe(torch.tensor([1.0, 5.0]), average=True)
    assert (q.min_val.item(), q.max_val.item()) == (0.0, 4.0)
    q.observe(torch.tensor([-2.0, 1.0]))  # widening, not averaging
    assert (q.min_val.item(), q.max_val.item()) == (-2.0, 4.0)


@pytest.mark.needs_cxx
def test_inductor_fake_quant_equals_eager() -> None:
    # Given the same inputs, inductor's fused LSQ rounds as eager does (x * (1/s), half to even,
    # clamp, * s): forward and gradients equal. (Whole compiled models differ from eager by more,
    # benchmarks/qat_step.py --compile: fused float arithmetic upstream flips some roundings.)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 8, 3, 3, generator=gen)
    x = torch.randn(4, 8, 6, 6, generator=gen) * 2 + 0.3
    wq, aq = WeightFakeQuant(bits=4, channels=16), ActFakeQuant(bits=8)
    wq(w)
    aq.observe(x)
    aq.init_from_range()
    for q, v in ((wq, w), (aq, x)):
        twin = copy.deepcopy(q)
        compiled = torch.compile(q, fullgraph=True)
        a, b = v.clone().requires_grad_(), v.clone().requires_grad_()
        got, expected = compiled(a), twin(b)
        assert torch.equal(got, expected)
        r = torch.randn(v.shape, generator=gen)
        (got * r).sum().backward()
        (expected * r).sum().backward()
        assert torch.equal(a.grad, b.grad)
        assert torch.allclose(q.scale.grad, twin.scale.grad, rtol=1e-5, atol=0)


# ----------------------------------------------------------------- repq_fx.compile

def _compile_kwargs(monkeypatch, model: nn.Module, **kwargs) -> dict:
    """What ``repq_fx.compile(model, **kwargs)`` hands to ``torch.compile``."""
    seen: dict = {}
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.update(kw) or m)
    assert repq_fx.compile(model, **kwargs) is model
    return seen


def test_compile_turns_layout_optimization_off_on_the_cpu(monkeypatch) -> None:
    model = nn.Conv2d(1, 2, 3)
    assert _compile_kwargs(monkeypatch, model)["options"] == {"layout_optimization": False}
    # the caller's options win, and are kept
    got = _compile_kwargs(monkeypatch, model, options={"layout_optimization": True, "max_autotune": True})
    assert got["options"] == {"layout_optimization": True, "max_autotune": True}
    # a mode becomes its options (torch.compile refuses mode and options together)
    from torch._inductor import list_mode_options
    got = _compile_kwargs(monkeypatch, model, mode="max-autotune-no-cudagraphs", fullgraph=True)
    assert "mode" not in got and got["fullgraph"] is True
    assert got["options"] == {**list_mode_options("max-autotune-no-cudagraphs"), "layout_optimization": False}
    with pytest.raises(ValueError, match="either mode or options"):
        repq_fx.compile(model, mode="max-autotune", options={"max_autotune": True})
    # other backends get exactly what was given
    assert "options" not in _compile_kwargs(monkeypatch, model, backend="aot_eager")


def test_compile_leaves_models_on_other_devices_to_inductor(monkeypatch) -> None:
    model = nn.Conv2d(1, 2, 3).to("meta")
    assert "options" not in _compile_kwargs(monkeypatch, model)


@pytest.mark.needs_cxx
def test_compiled_step_makes_no_copies_of_the_kernels() -> None:
    # Regression: with inductor's default channels-last layout on the CPU, the computed conv
    # kernels of a prepared model came out channels-last and the conv backward and gradient
    # accumulation copied each of them back (~15 ms of a 190 ms repvgg_a0 step). repq_fx.compile's
    # step copies no kernel-sized tensor, and computes what eager does.
    from torch.profiler import ProfilerActivity, profile

    eager = _prepared(bn_mode="estimate").train()
    repq_fx.disable_fake_quant(eager)  # no rounding decisions: compiled and eager agree to float noise
    model = copy.deepcopy(eager)
    compiled = repq_fx.compile(model)
    x = _x(2)
    compiled(x).sum().backward()  # compiles forward and backward
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        got = compiled(x)
        got.sum().backward()
    expected = eager(x)
    expected.sum().backward()
    kernel_shapes = {str(list(p.shape)) for p in model.parameters() if p.dim() == 4}
    copies = [(e.name, e.input_shapes[0]) for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::_to_copy") and e.input_shapes
              and str(e.input_shapes[0]) in kernel_shapes]
    assert not copies, copies
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is not None:
            assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5), name
