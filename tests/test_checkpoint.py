"""Checkpoint safety: a prepared model's ``state_dict`` is a complete checkpoint.

Saved with ``torch.save`` and loaded with ``torch.load(weights_only=True)`` into a fresh
``prepare`` of the same model (or of a freshly built model of the same architecture), it
reproduces the outputs bit for bit in eval and train mode, after ``calibrate`` and training
steps, for LSQ and min-max quantizers, per-channel and per-tensor weights and every
``bn_mode``; training then continues identically. The quantizer state (steps, zero points,
observed ranges, ``enabled``/``initialized``/``observing`` flags) round-trips, including
quantizers switched off or never initialised. Float checkpoints load in both directions with
``strict=False``: the original model's ``state_dict`` into a prepared model (only quantizer keys
missing; the same as preparing the trained model) and a prepared model's into the float model
(only quantizer keys unexpected).

Everything runs in float32, the dtype checkpoints are trained in; "bit for bit" is
``torch.equal``.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repq_fx
from repq_fx.testing import blocks as B
from repq_fx.quant.fake_quant import ActFakeQuant, WeightFakeQuant, _FakeQuant

IN_CHANNELS, SPATIAL, CLASSES = 3, (12, 12), 5
_PY_STATE = ("bits", "quant_min", "quant_max", "learned")  # quantizer attributes that are not tensors


class Net(nn.Module):
    """One block of each kind whose merged weight reads different things: RepVGG (identity BN), ACNet
    (crop), DBB (BN-valued padding: running statistics inside M), ECB (mask buffers, PReLU), QARepVGG
    v2 (avg-pool, post-BN), and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = B.RepVGGBlock(IN_CHANNELS, 8, stride=2)
        self.acb = B.ACBlock(8, 8, 3)
        self.dbb = B.DiverseBranchBlock(8, 8, 3)
        self.ecb = B.ECB(8, 8, depth_multiplier=2.0, act_type="prelu", with_idt=True)
        self.qarep = B.QARepVGGBlockV2(8, 8, 3)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.qarep(self.ecb(self.dbb(self.acb(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def _batch(seed: int, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN_CHANNELS, *SPATIAL, generator=g) + 0.3


def _float_model(seed: int = 0) -> nn.Module:
    """``Net`` with every parameter perturbed and BN statistics from a few train-mode forwards; eval mode."""
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.train()
        for i in range(3):
            model(_batch(100 + i))
    return model.eval()


CONFIGS = [
    pytest.param(dict(), id="lsq-batch"),
    pytest.param(dict(weight_quantizer="minmax", act_quantizer="minmax", bn_mode="estimate"), id="minmax-estimate"),
    pytest.param(dict(weight_bits=4, act_bits=4, per_channel=False, bn_mode="running", first_last_bits=None,
                      act_quantizer="minmax"), id="w4a4-per-tensor-running"),
]


def _train_step(qmodel: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    qmodel.train()
    opt.zero_grad()
    x = _batch(seed)
    F.cross_entropy(qmodel(x), torch.arange(len(x)) % CLASSES).backward()
    opt.step()


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _quantizers(model: nn.Module) -> dict[str, _FakeQuant]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _FakeQuant)}


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different


def _assert_same_quantizers(a: nn.Module, b: nn.Module) -> None:
    qa, qb = _quantizers(a), _quantizers(b)
    assert qa.keys() == qb.keys() and qa
    for name, q in qa.items():
        other = qb[name]
        assert type(q) is type(other), name
        for attr in _PY_STATE:
            assert getattr(q, attr) == getattr(other, attr), f"{name}.{attr}"
        tensors = ["scale", "zero_point", "enabled", "initialized"]
        if isinstance(q, ActFakeQuant):
            tensors += ["min_val", "max_val", "observing"]
        for attr in tensors:
            assert torch.equal(getattr(q, attr), getattr(other, attr)), f"{name}.{attr}"


def _assert_same_outputs(a: nn.Module, b: nn.Module, seed: int) -> None:
    """Eval and train mode outputs bit for bit, and the same state after each forward.

    On copies: a forward changes quantizer state (min-max weight steps follow the weights, an LSQ
    step an optimizer pushed below zero is clamped), so ``a`` and ``b`` stay as they were.
    """
    x = _batch(seed)
    for train in (False, True):
        ca, cb = copy.deepcopy(a).train(train), copy.deepcopy(b).train(train)
        with torch.no_grad():
            assert torch.equal(ca(x), cb(x)), f"train={train}"
        _assert_same_state(ca, cb)
        _assert_same_quantizers(ca, cb)


@pytest.fixture(scope="module")
def float_model() -> nn.Module:
    return _float_model()


@pytest.mark.parametrize("config", CONFIGS)
def test_checkpoint_reproduces_training_bit_for_bit(float_model: nn.Module, config: dict) -> None:
    cfg = repq_fx.QConfig(**config)
    qmodel = repq_fx.prepare(float_model, cfg)
    repq_fx.calibrate(qmodel, [_batch(10 + i) for i in range(3)])
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.02, momentum=0.9)
    for step in range(2):
        _train_step(qmodel, opt, seed=20 + step)
    # A quantizer switched off stays off after loading.
    off = next(q for q in _quantizers(qmodel).values() if isinstance(q, ActFakeQuant))
    off.enable(False)

    model_state = _roundtrip(qmodel.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    saved = copy.deepcopy(qmodel)
    # The checkpoint restores into prepare() of the same float model, or of a freshly built one
    # (different weights): nothing the prepared graph computes is baked in from the weights it was built from.
    for source in (float_model, _float_model(seed=1)):
        fresh = repq_fx.prepare(source, cfg)
        result = fresh.load_state_dict(model_state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys

        _assert_same_quantizers(fresh, saved)
        _assert_same_state(fresh, saved)
        _assert_same_outputs(fresh, saved, seed=30)

        # Training resumes identically (optimizer state restored the same way).
        a, b = copy.deepcopy(saved), fresh
        opt_a = torch.optim.SGD(a.parameters(), lr=0.02, momentum=0.9)
        opt_a.load_state_dict(_roundtrip(opt_state))  # (load_state_dict shares the tensors it is given)
        opt_b = torch.optim.SGD(b.parameters(), lr=0.02, momentum=0.9)
        opt_b.load_state_dict(_roundtrip(opt_state))
        _train_step(a, opt_a, seed=40)
        _train_step(b, opt_b, seed=40)
        _assert_same_state(a, b)
        _assert_same_quantizers(a, b)
        _assert_same_outputs(a, b, seed=41)


def test_checkpoint_of_calibrated_model_without_training(float_model: nn.Module) -> None:
    qmodel = repq_fx.prepare(float_model)
    repq_fx.calibrate(qmodel, [_batch(50), _batch(51)])
    assert all(bool(q.initialized) for q in _quantizers(qmodel).values())
    fresh = repq_fx.prepare(float_model)
    fresh.load_state_dict(_roundtrip(qmodel.state_dict()))
    _assert_same_quantizers(fresh, qmodel)
    _assert_same_outputs(fresh, qmodel, seed=52)


def test_checkpoint_of_uninitialized_quantizers(float_model: nn.Module) -> None:
    # Saved straight after prepare: the quantizers have seen nothing, and after loading they still
    # initialise from the first batch, exactly as the saved model would have.
    qmodel = repq_fx.prepare(float_model)
    assert not any(bool(q.initialized) for q in _quantizers(qmodel).values())
    fresh = repq_fx.prepare(_float_model(seed=3))
    fresh.load_state_dict(_roundtrip(qmodel.state_dict()))
    _assert_same_quantizers(fresh, qmodel)
    _assert_same_outputs(fresh, qmodel, seed=53)  # (on copies: both still uninitialised)
    x = _batch(54)
    with torch.no_grad():
        assert torch.equal(fresh.train()(x), qmodel.train()(x))
    _assert_same_quantizers(fresh, qmodel)


def test_whole_prepared_module_pickles(float_model: nn.Module) -> None:
    # Regression: FX re-traces a pickled GraphModule's code on load; it traced into our BN-statistics
    # functions (LeafTracer now keeps repq_fx's own graph functions as calls), and tensor methods
    # reached through Sym.__torch_function__ were recorded as `torch.Tensor.mul` function targets,
    # which FX writes as an invalid import (now recorded as method calls).
    # Python-level quantizer settings (bit widths of first/last layers, min-max vs LSQ) are rebuilt by
    # prepare() for a state_dict checkpoint; a whole-module pickle should keep them too.
    qmodel = repq_fx.prepare(float_model, repq_fx.QConfig(weight_bits=4, act_bits=4, first_last_bits=8))
    repq_fx.calibrate(qmodel, [_batch(60)])
    buf = io.BytesIO()
    torch.save(qmodel, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, fx.GraphModule)
    bits = sorted({q.bits for q in _quantizers(loaded).values() if isinstance(q, WeightFakeQuant)})
    assert bits == [4, 8]
    _assert_same_quantizers(loaded, qmodel)
    _assert_same_outputs(loaded, qmodel, seed=61)


def test_float_state_dict_loads_into_prepared_model(float_model: nn.Module) -> None:
    qmodel = repq_fx.prepare(_float_model(seed=5))  # other weights
    result = qmodel.load_state_dict(_roundtrip(float_model.state_dict()), strict=False)

    assert not result.unexpected_keys
    assert result.missing_keys
    for key in result.missing_keys:
        assert isinstance(qmodel.get_submodule(key.rpartition(".")[0]), _FakeQuant), key
    # Loading the trained float weights is the same as preparing the trained model.
    reference = repq_fx.prepare(float_model)
    _assert_same_state(qmodel, reference)
    _assert_same_outputs(qmodel, reference, seed=70)
    # With fake quant off it is the float model.
    repq_fx.disable_fake_quant(qmodel)
    x = _batch(71)
    with torch.no_grad():
        assert torch.allclose(qmodel.eval()(x), float_model(x), rtol=1e-4, atol=1e-5)


def test_prepared_state_dict_loads_into_float_model(float_model: nn.Module) -> None:
    # The names are the original model's, so QAT weights go back into the float model as they are.
    qmodel = repq_fx.prepare(float_model)
    repq_fx.calibrate(qmodel, [_batch(80)])
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05)
    _train_step(qmodel, opt, seed=81)

    model = _float_model(seed=6)
    result = model.load_state_dict(_roundtrip(qmodel.state_dict()), strict=False)

    assert not result.missing_keys
    for key in result.unexpected_keys:
        assert isinstance(qmodel.get_submodule(key.rpartition(".")[0]), _FakeQuant), key
    repq_fx.disable_fake_quant(qmodel)
    x = _batch(82)
    with torch.no_grad():
        assert torch.allclose(qmodel.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


class _BufferGain(nn.Module):
    """A conv scaled by ``exp(log_gain)``, ``log_gain`` a buffer: an expression of buffers alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(IN_CHANNELS, 4, 3, padding=1)
        self.register_buffer("log_gain", torch.zeros(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.log_gain)


def test_buffer_expressions_follow_loaded_buffers() -> None:
    # Regression: FX evaluated expressions of buffers alone at trace time (its tracer does not proxy
    # buffers read as attributes) and stored the result as a persistent `_tensor_constant0`: loading
    # another model's state_dict (strict=False) left the prepared model computing with the old buffer,
    # and DBB's pad value sqrt(running_var + eps) was frozen at prepare time.
    a, b = _BufferGain(), _BufferGain()
    with torch.no_grad():
        b.log_gain.normal_()
        b.conv.weight.mul_(2)
    qmodel = repq_fx.prepare(a)
    result = qmodel.load_state_dict(b.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(isinstance(qmodel.get_submodule(k.rpartition(".")[0]), _FakeQuant) for k in result.missing_keys)
    repq_fx.disable_fake_quant(qmodel)
    x = _batch(90)
    with torch.no_grad():
        assert torch.allclose(qmodel.eval()(x), b(x), rtol=1e-5, atol=1e-6)
    assert not [k for k in qmodel.state_dict() if "_tensor_constant" in k]



def test_checkpoint_of_other_bit_widths_is_refused_by_name():
    """Bits were Python attributes, not state: a W4A4 state_dict loaded silently into a W8A8
    prepare (W4 steps on an 8-bit grid). The grid is now a buffer and a mismatch names the layer."""
    from repq_fx.quant.fake_quant import WeightFakeQuant

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    w4 = repq_fx.prepare(model, repq_fx.QConfig(weight_bits=4, act_bits=4))
    w8 = repq_fx.prepare(model, repq_fx.QConfig(weight_bits=8, act_bits=8))
    with pytest.raises(RuntimeError, match=r"grid \[-8, 7\] \(4 bits\).*\[-64, 64\] \(8 bits\)"):
        w8.load_state_dict(w4.state_dict(), strict=False)
    w4_again = repq_fx.prepare(model, repq_fx.QConfig(weight_bits=4, act_bits=4))
    w4_again.load_state_dict(w4.state_dict())  # same grids: loads
    assert any(isinstance(m, WeightFakeQuant) for m in w4_again.modules())


def test_checkpoint_written_before_quant_range_existed_still_loads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    qmodel = repq_fx.prepare(model, repq_fx.QConfig(weight_bits=4, act_bits=4))
    old = qmodel.state_dict()
    for key in [k for k in old if k.endswith("quant_range")]:
        del old[key]
    for key in [k for k in old._metadata if "fake_quant" in k]:
        old._metadata[key]["version"] = 1
    repq_fx.prepare(model, repq_fx.QConfig(weight_bits=4, act_bits=4)).load_state_dict(old)  # strict


def test_checkpoint_of_another_target_is_refused_naming_the_target():
    """The target is part of the trained grid: full-range int8 weights (onnxruntime-vnni) must not load
    into a model prepared for ONNX Runtime's default scheme (|w| <= 64 behind 8-bit inputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    vnni = repq_fx.prepare(model, repq_fx.QConfig(target="onnxruntime-vnni"))
    default = repq_fx.prepare(model, repq_fx.QConfig())
    with pytest.raises(RuntimeError, match=r"\[-128, 127\].*\[-64, 64\].*target"):
        default.load_state_dict(vnni.state_dict())
    repq_fx.prepare(model, repq_fx.QConfig(target="onnxruntime-vnni")).load_state_dict(vnni.state_dict())
