"""``repq_fx.prepare`` (the RepQ QAT model) against the contract in docs/design.md.

1. Fake quant off, ``bn_mode="batch"``, float64: the prepared model computes the original
   function in train mode (output and the running statistics after the step, also with
   ``momentum=None``) and in eval mode, for timm models and the example blocks.
2. ``bn_mode="estimate"`` (RepQ-BNEst): exact in eval mode; the estimated mean is exact where
   borders do not matter; the variance error (diagonal input covariance) is measured and
   bounded. ``bn_mode="running"`` folds running statistics even in train mode.
3. Gradients with fake quant on reach every parameter, and the LSQ step sizes.
4. W8A8 after calibration stays close to the float model; W4A4 is worse.
5. The generated code: one merged weight, weight fake quant and conv2d per merged block.
6. ``state_dict`` round-trips (float checkpoints load; quantizer state survives save/load).
7. ``torch.compile`` agrees with eager.
9. Bad input raises ``ConfigError`` / ``RepQError`` naming the problem.

(8, DDP, is in ``test_ddp.py``.) Errors are relative: ``max|a - b| / max|b|``.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import math
import re
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repq_fx
from repq_fx.testing import blocks as B
from repq_fx.quant.bn_stats import BnMode, Branch, branch_statistics
from repq_fx.quant.fake_quant import ActFakeQuant, WeightFakeQuant, fake_quantizers

REL_TOL = 1e-9
SPATIAL = (11, 13)  # odd and non-square, so row/column mix-ups and border handling show
_BN = nn.modules.batchnorm._BatchNorm


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------

def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _input(channels: int, batch: int = 4, spatial: tuple[int, int] = SPATIAL, seed: int = 1,
           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, *spatial, generator=g) + 0.5).to(dtype)


def _calibrated(make: Callable[[], nn.Module], channels: int, spatial: tuple[int, int] = SPATIAL, seed: int = 0,
                dtype: torch.dtype = torch.float64, all_params: bool = True, steps: int = 3) -> nn.Module:
    """``make()`` under a fixed seed; every parameter perturbed (so zero-initialised branches take
    part); BN running stats from a few train-mode forwards (cumulative average); momentum set back
    to 0.1; in ``dtype``; eval mode.

    The forwards run in float32 (float64 grouped convs are very slow on CPU) before the cast."""
    torch.manual_seed(seed)
    module = make().float()
    with torch.no_grad():
        for p in module.parameters():
            if all_params or p.numel() == p.shape[0]:
                p.add_(0.1 * torch.randn_like(p))
        bns = [m for m in module.modules() if isinstance(m, _BN)]
        for m in bns:
            m.momentum = None
        module.train()
        for step in range(steps):
            module(_input(channels, spatial=spatial, seed=100 + step, dtype=torch.float32))
        for m in bns:
            m.momentum = 0.1
    return module.to(dtype).eval()


def _state_err(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per key: ``max|a - e| / max(max|e|, 1)`` (some running means are ~1e-17, so not relative)."""
    errs = {}
    for k, e in expected.items():
        a = actual[k]
        if not e.is_floating_point():
            errs[k] = 0.0 if torch.equal(a, e) else math.inf
        else:
            errs[k] = ((a.double() - e.double()).abs().max() / max(e.double().abs().max().item(), 1.0)).item()
    return errs


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _prepare_float(model: nn.Module, **config) -> fx.GraphModule:
    """``prepare`` with every fake quantizer off."""
    qmodel = repq_fx.prepare(model, repq_fx.QConfig(**config))
    repq_fx.disable_fake_quant(qmodel)
    return qmodel


def _check_train_step(model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> None:
    """One train-mode forward of ``qmodel`` equals one of a copy of ``model``: output and state."""
    before = _snapshot(model)
    ref = copy.deepcopy(model).train()
    qmodel.train()
    with torch.no_grad():
        expected = ref(x)
        got = qmodel(x)
    assert got.shape == expected.shape
    assert _rel_err(got, expected) <= REL_TOL
    errs = _state_err(qmodel.state_dict(), ref.state_dict())
    bad = {k: v for k, v in errs.items() if v > REL_TOL}
    assert not bad, f"state after one train step differs: {bad}"
    tracked = [k for k in ref.state_dict() if k.endswith("num_batches_tracked")]
    assert all(int(qmodel.state_dict()[k]) == int(ref.state_dict()[k]) for k in tracked)
    # The prepared model owns its tensors: training it leaves the input model alone.
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "prepare shares state with its input"
    # Eval mode after the step: both fold the (identically updated) running statistics.
    ref.eval()
    qmodel.eval()
    with torch.no_grad():
        assert _rel_err(qmodel(x), ref(x)) <= REL_TOL


def _weight_quantized_convs(gm: fx.GraphModule) -> list[fx.Node]:
    """conv2d calls whose weight is the output of a WeightFakeQuant."""
    modules = dict(gm.named_modules())
    convs = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(w, fx.Node) and w.op == "call_module" and isinstance(modules[w.target], WeightFakeQuant):
                convs.append(node)
    return convs


def _data_path_convs(gm: fx.GraphModule) -> list[fx.Node]:
    """conv2d calls whose input depends on a graph input (not only on parameters)."""
    tainted: set[fx.Node] = set()
    convs = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
            if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d) and node.args[0] in tainted:
                convs.append(node)
    return convs


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------

BLOCK_CASES = [
    pytest.param(lambda: B.RepVGGBlock(8, 8, 3, stride=1), 8, id="repvgg-s1"),
    pytest.param(lambda: B.RepVGGBlock(8, 16, 3, stride=2, groups=2), 8, id="repvgg-s2-g2"),
    pytest.param(lambda: B.QARepVGGBlock(8, 8, 3), 8, id="qarep"),
    pytest.param(lambda: B.QARepVGGBlockV2(8, 8, 3), 8, id="qarep2"),
    pytest.param(lambda: B.ACBlock(8, 8, 3), 8, id="acb"),
    pytest.param(lambda: B.ACBlock(8, 16, 5, stride=2, padding=1, groups=2), 8, id="acb-crop-s2"),
    pytest.param(lambda: B.OREPABlock(8, 16, 3), 8, id="orepa"),
    pytest.param(lambda: B.ECB(8, 8, depth_multiplier=2.0, act_type="prelu", with_idt=True), 8, id="ecb"),
    pytest.param(lambda: B.ReparamLargeKernelConv(8, 8, 7, small_kernel=3), 8, id="replk"),
    pytest.param(lambda: B.DilatedReparamBlock(8, kernel_size=7), 8, id="dilated"),
]
DBB = pytest.param(lambda: B.DiverseBranchBlock(8, 16, 3), 8, id="dbb")

TIMM_MODELS = ["repvgg_a0", "mobileone_s0", "fastvit_t8"]
TIMM_SPATIAL = (32, 32)


def _timm(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    timm = pytest.importorskip("timm")
    # Only per-channel vectors are perturbed (BN affine, biases, FastViT's 1e-5 layer scales).
    return _calibrated(lambda: timm.create_model(name, pretrained=False, drop_rate=0.0, num_classes=10), 3,
                       spatial=TIMM_SPATIAL, dtype=dtype, all_params=False, steps=2)


@pytest.fixture(scope="module")
def net32() -> nn.Module:
    """The example RepVGGNet (Fashion-MNIST size), float32, BN calibrated, eval mode."""
    return _calibrated(B.RepVGGNet, 1, spatial=(28, 28), dtype=torch.float32)


def _net_batches(n: int, batch: int = 8, seed: int = 10) -> list[torch.Tensor]:
    return [_input(1, batch=batch, spatial=(28, 28), seed=seed + i, dtype=torch.float32) for i in range(n)]


@pytest.fixture(scope="module")
def net_calibrated(net32: nn.Module) -> fx.GraphModule:  # used by the state_dict round trip
    """prepare(net32) (W8A8 LSQ) after calibrate on 4 batches, fake quant on, eval mode."""
    qmodel = repq_fx.prepare(net32)
    repq_fx.calibrate(qmodel, _net_batches(4))
    return qmodel.eval()


# ---------------------------------------------------------------------------
# 1. Fake quant off, bn_mode="batch": the original function, train and eval.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("make, channels", BLOCK_CASES)
def test_block_equals_original_train_and_eval(make: Callable[[], nn.Module], channels: int,
                                              momentum: float | None) -> None:
    block = _calibrated(make, channels)
    for m in block.modules():
        if isinstance(m, _BN):
            m.momentum = momentum
    qmodel = _prepare_float(block)
    assert isinstance(qmodel, fx.GraphModule)
    assert not qmodel.training, "prepare keeps the mode of its input"
    with torch.no_grad():
        assert _rel_err(qmodel(_input(channels, seed=2)), block(_input(channels, seed=2))) <= REL_TOL
    _check_train_step(block, qmodel, _input(channels, seed=3))


def test_dbb_equals_original_eval() -> None:
    # DBB is checked in eval mode only: its BNAndPadLayer pads with a value computed from the
    # *running* statistics while its BN normalizes with *batch* statistics in train mode, so the
    # train-mode DBB is not one conv of its input (the border pixels see a different affine map).
    make, channels = DBB.values
    block = _calibrated(make, channels)
    qmodel = _prepare_float(block)
    x = _input(channels, seed=2)
    with torch.no_grad():
        assert _rel_err(qmodel.eval()(x), block(x)) <= REL_TOL
    # Train mode still runs, and following .train() switches to batch statistics.
    qmodel.train()
    with torch.no_grad():
        assert qmodel(x).shape == block(x).shape


def test_follows_train_eval_whatever_mode_it_was_prepared_in() -> None:
    block = _calibrated(lambda: B.RepVGGBlock(8, 8), 8).train()
    qmodel = _prepare_float(block)
    assert qmodel.training
    x = _input(8, seed=4)
    qmodel.eval()
    with torch.no_grad():
        assert _rel_err(qmodel(x), copy.deepcopy(block).eval()(x)) <= REL_TOL
    _check_train_step(block, qmodel, x)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_equals_original_train_and_eval(name: str) -> None:
    # (float64 grouped convs are slow on CPU: one train step, then eval, on 2 x 3 x 32 x 32.)
    model = _timm(name)
    qmodel = _prepare_float(model)
    _check_train_step(model, qmodel, _input(3, batch=2, spatial=TIMM_SPATIAL, seed=5))


# ---------------------------------------------------------------------------
# 2. bn_mode="estimate" and bn_mode="running".
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, channels", [c for c in BLOCK_CASES if c.id != "ecb"])  # ECB has no BN
def test_estimate_eval_exact(make: Callable[[], nn.Module], channels: int) -> None:
    block = _calibrated(make, channels)
    qmodel = _prepare_float(block, bn_mode="estimate").eval()
    x = _input(channels, seed=6)
    with torch.no_grad():
        assert _rel_err(qmodel(x), block(x)) <= REL_TOL


def _geometry(conv: nn.Conv2d) -> tuple:
    (ph, pw) = conv.padding
    return (conv.stride, ((ph, ph), (pw, pw)), conv.dilation, conv.groups)


def test_estimate_mean_is_exact_without_borders() -> None:
    torch.manual_seed(0)
    scale = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).reshape(1, -1, 1, 1)
    shift = torch.arange(6, dtype=torch.float64).reshape(1, -1, 1, 1)
    x = _input(6, batch=4, spatial=(9, 10), seed=7) * scale + shift  # per-channel means 0.25 .. 6
    # A 1x1 conv with bias: every output pixel sees one input pixel, no border.
    conv = nn.Conv2d(6, 8, 1, bias=True).double()
    bn = nn.BatchNorm2d(8).double().train()
    branch = Branch(conv.weight, conv.bias, *_geometry(conv)[:2], (1, 1), 1)
    mean, _ = branch_statistics(x, branch, bn, BnMode.ESTIMATE)
    y = conv(x)
    assert _rel_err(mean, y.mean((0, 2, 3))) <= REL_TOL
    # The running mean moved by momentum * (batch mean) from 0, exactly as nn.BatchNorm2d would.
    assert _rel_err(bn.running_mean, 0.1 * y.mean((0, 2, 3))) <= REL_TOL
    assert int(bn.num_batches_tracked) == 1
    # A grouped 3x3 conv where padding does not reach: run it validly on the *circularly* padded
    # x, so that every pixel of x is seen by every tap exactly once. Its output mean is then
    # sum W * E[x], which is what the estimate computes from x's moments.
    conv3 = nn.Conv2d(6, 8, 3, groups=2, bias=False).double()
    mean3, _ = branch_statistics(x, Branch(conv3.weight, None, (1, 1), ((0, 0), (0, 0)), (1, 1), 2),
                                 nn.BatchNorm2d(8).double().train(), BnMode.ESTIMATE)
    true3 = conv3(F.pad(x, (1, 1, 1, 1), mode="circular")).mean((0, 2, 3))
    assert _rel_err(mean3, true3) <= REL_TOL


def test_estimate_running_stats_of_1x1_block_match_original() -> None:
    """A 1x1 conv + BN block trained one step with bn_mode="estimate": its running mean is the
    original's (the mean estimate is exact without borders)."""
    model = _calibrated(lambda: nn.Sequential(nn.Conv2d(6, 8, 1, bias=True), nn.BatchNorm2d(8)), 6)
    qmodel = _prepare_float(model, bn_mode="estimate").train()
    ref = copy.deepcopy(model).train()
    x = _input(6, seed=8)
    with torch.no_grad():
        qmodel(x)
        ref(x)
    assert _state_err(qmodel.state_dict(), ref.state_dict())["1.running_mean"] <= REL_TOL
    assert int(qmodel.state_dict()["1.num_batches_tracked"]) == int(ref.state_dict()["1.num_batches_tracked"])


def _var_errors(correlated: bool) -> dict[str, float]:
    """Max relative error of the estimated per-channel variance against the true batch variance,
    for the BN'd convs of some example blocks (random weights), on iid or spatially smooth inputs."""
    torch.manual_seed(0)
    convs = {
        "repvgg 3x3": B.RepVGGBlock(16, 16).rbr_dense.conv,
        "repvgg 1x1": B.RepVGGBlock(16, 16).rbr_1x1.conv,
        "acb 3x1": B.ACBlock(16, 16).ver_conv,
        "replk dw 7x7": B.ReparamLargeKernelConv(16, 16, 7, small_kernel=3).lkb_origin.conv,
        "dilated dw 3x3 r3": B.DilatedReparamBlock(16, 7).dil_conv_k3_3,
    }
    x = _input(16, batch=4, spatial=(32, 32), seed=9)
    if correlated:
        x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    errs = {}
    for name, conv in convs.items():
        conv = conv.double()
        stride, padding, dilation, groups = _geometry(conv)
        branch = Branch(conv.weight, None, stride, padding, dilation, groups)
        with torch.no_grad():
            _, est = branch_statistics(x, branch, nn.BatchNorm2d(16).double().train(), BnMode.ESTIMATE)
            _, true = branch_statistics(x, branch, nn.BatchNorm2d(16).double().train(), BnMode.BATCH)
        errs[name] = ((est - true).abs() / true).max().item()
    return errs


def test_estimate_variance_error_is_bounded() -> None:
    # Measured (torch 2.14.1, CPU), max over output channels of |var_est - var| / var on
    # 4x16x32x32 inputs (run with -s to see them):
    #   iid N(0.5, 1) input:  repvgg 3x3 0.069, repvgg 1x1 0.031, acb 3x1 0.055, replk dw 7x7 0.15,
    #                         dilated dw 3x3 r3 0.18 (zero padding lowers the true variance near
    #                         borders; sampling noise of the off-diagonal input covariance)
    #   3x3-smoothed input:   repvgg 3x3 0.28, repvgg 1x1 0.073, acb 3x1 0.55, replk dw 7x7 0.65,
    #                         dilated dw 3x3 r3 0.26 (spatially correlated activations break the
    #                         diagonal-covariance assumption: what RepQ-BNEst trades for speed)
    iid, smooth = _var_errors(False), _var_errors(True)
    print("\nestimate-mode variance relative error, iid input:", {k: round(v, 3) for k, v in iid.items()})
    print("estimate-mode variance relative error, smooth input:", {k: round(v, 3) for k, v in smooth.items()})
    assert max(iid.values()) < 0.3
    assert max(smooth.values()) < 1.0
    assert all(math.isfinite(v) for v in smooth.values())


def test_estimate_train_output_close_to_batch() -> None:
    # Measured rel. L2 error of the train-mode output, bn_mode="estimate" vs the original block
    # (batch statistics), on 4x16x32x32 iid inputs: RepVGG 0.017, ACB 0.027, QARepVGG-V2 0.023,
    # Dilated (k7) 0.070.
    cases = {"repvgg": lambda: B.RepVGGBlock(16, 16), "acb": lambda: B.ACBlock(16, 16),
             "qarep2": lambda: B.QARepVGGBlockV2(16, 16), "dilated": lambda: B.DilatedReparamBlock(16, 7)}
    errs = {}
    x = _input(16, batch=4, spatial=(32, 32), seed=9)
    for name, make in cases.items():
        block = _calibrated(make, 16, spatial=(32, 32))
        qmodel = _prepare_float(block, bn_mode="estimate").train()
        with torch.no_grad():
            errs[name] = _rel_l2(qmodel(x), copy.deepcopy(block).train()(x))
    print("\nestimate-mode train output, rel. L2 error vs batch statistics:",
          {k: round(v, 3) for k, v in errs.items()})
    assert max(errs.values()) < 0.15
    assert min(errs.values()) > 0  # it is an estimate: not silently the batch statistics


def test_running_mode_uses_running_stats_in_train() -> None:
    block = _calibrated(lambda: B.QARepVGGBlockV2(8, 8), 8)
    qmodel = _prepare_float(block, bn_mode="running").train()
    x = _input(8, seed=10)
    before = _snapshot(block)
    with torch.no_grad():
        expected = block.eval()(x)
        got = qmodel(x)
    assert qmodel.training
    assert _rel_err(got, expected) <= REL_TOL
    # Frozen BN: the running statistics are not updated either (only the original model's keys:
    # the quantizers initialise themselves on their first forward, even when disabled).
    after = qmodel.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed


# ---------------------------------------------------------------------------
# 3. Gradients with fake quant on.
# ---------------------------------------------------------------------------

# DBB: see test_dbb_train_backward (a regression test).
GRAD_CASES = BLOCK_CASES


def _backward_once(model: nn.Module, channels: int, spatial: tuple[int, int]) -> tuple[fx.GraphModule, set[str]]:
    """prepare + calibrate, fake quant on, one train-mode backward. Also returns the parameters
    whose gradient is zero in the *original* float model on the same loss (e.g. ECB's 1x1 bias
    before a Sobel/Laplacian mask: the mask sums to zero and the padding is the bias itself)."""
    x = _input(channels, spatial=spatial, seed=30, dtype=torch.float32)

    def loss(out: torch.Tensor) -> torch.Tensor:
        # Not out.sum(): a BN-normalised output sums to a constant, which would zero the conv grads.
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return (out * r.to(out.dtype)).sum()

    ref = copy.deepcopy(model).double().train()  # float64, so "zero" is zero up to ~1e-16
    loss(ref(x.double())).backward()
    zero_in_original = {n for n, p in ref.named_parameters() if p.grad is None or p.grad.abs().max() < 1e-10}

    qmodel = repq_fx.prepare(model)
    repq_fx.calibrate(qmodel, [_input(channels, spatial=spatial, seed=20 + i, dtype=torch.float32)
                               for i in range(2)])
    qmodel.train()
    loss(qmodel(x)).backward()
    return qmodel, zero_in_original


def _assert_all_grads(qmodel: nn.Module, zero_ok: set[str]) -> None:
    missing = [n for n, p in qmodel.named_parameters() if p.grad is None]
    assert not missing, f"no grad: {missing}"
    bad = [n for n, p in qmodel.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite grad: {bad}"
    zero = [n for n, p in qmodel.named_parameters() if not p.grad.abs().sum() > 0 and n not in zero_ok]
    assert not zero, f"zero grad: {zero}"
    quantizers = [n for n, m in qmodel.named_modules() if isinstance(m, (WeightFakeQuant, ActFakeQuant))]
    assert quantizers, "no fake quantizers"
    for n in quantizers:
        q = qmodel.get_submodule(n)
        assert q.learned and isinstance(q.scale, nn.Parameter) and q.scale.grad is not None, n


@pytest.mark.parametrize("make, channels", GRAD_CASES)
def test_block_gradients_with_fake_quant(make: Callable[[], nn.Module], channels: int) -> None:
    block = _calibrated(make, channels, dtype=torch.float32)
    qmodel, zero_ok = _backward_once(block, channels, SPATIAL)
    _assert_all_grads(qmodel, zero_ok)
    # Every parameter of the original block is a parameter of the prepared one (same name).
    assert {n for n, _ in block.named_parameters()} <= {n for n, _ in qmodel.named_parameters()}


def test_net_gradients_with_fake_quant(net32: nn.Module) -> None:
    qmodel, zero_ok = _backward_once(net32, 1, (28, 28))
    assert not zero_ok
    _assert_all_grads(qmodel, zero_ok)
    # LSQ step sizes of weights and activations: one per quantizer, all with a grad.
    steps = [n for n, _ in qmodel.named_parameters() if n.endswith("fake_quant.scale")]
    assert len(steps) == len(fake_quantizers(qmodel))


# ---------------------------------------------------------------------------
# 4. W8A8 / W4A4 error after calibration.
# ---------------------------------------------------------------------------

def _ptq_merged(model: nn.Module, x: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent oracle: ``merge(model)`` with every conv/linear weight rounded symmetric per
    output channel to ``bits`` (step ``max|w| / (2^(bits-1) - 1)``), activations in float."""
    merged = copy.deepcopy(repq_fx.merge(model))
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in merged.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                step = (w.abs().flatten(1).amax(1) / qmax).reshape(-1, *[1] * (w.dim() - 1))
                w.copy_((w / step).round().clamp(-qmax - 1, qmax) * step)
        return merged(x)


def _quant_errors(model: nn.Module, batches: list[torch.Tensor], x: torch.Tensor, bits: int,
                  pick: Callable[[torch.Tensor], torch.Tensor] = lambda y: y) -> tuple[float, float]:
    """(W``bits``A``bits`` error, weights-only error) of prepare + calibrate against the float model.
    Min-max step initialisation, so that the weights-only error is that of the min-max PTQ oracle.
    The oracle rounds to the full signed grid, so the model is prepared for the target that keeps it
    (the default target narrows weights behind 8-bit unsigned inputs to [-64, 64], see test_targets.py)."""
    config = repq_fx.QConfig(weight_bits=bits, act_bits=bits, first_last_bits=None, step_init="minmax",
                             target="onnxruntime-vnni")
    qmodel = repq_fx.prepare(model, config)
    repq_fx.calibrate(qmodel, batches)
    qmodel.eval()
    with torch.no_grad():
        ref = pick(model.eval()(x))
        full = _rel_l2(pick(qmodel(x)), ref)
        for q in fake_quantizers(qmodel):
            q.enable(isinstance(q, WeightFakeQuant))
        weights_only = _rel_l2(pick(qmodel(x)), ref)
    return full, weights_only


# Measured (torch 2.14.1, CPU; first_last_bits=None, so every layer has the same width), relative
# L2 error of the eval-mode output against the float model (run with -s to see them):
#   RepVGGNet 1x28x28 (9 blocks):        W8A8 0.066, W8 only 0.065 (= PTQ oracle), W4A4 1.2
#   repvgg_a0 stem + stage 0 (3 blocks): W8A8 0.11,  W4A4 0.57
#   repvgg_a0 full (22 blocks + head):   W8A8 1.06,  W8 only 0.83 (= PTQ oracle to 1e-5)
# A "< 5%" bound is not reachable with randomly initialised RepVGGs, and not because of
# repq_fx: the merged kernel of a block with an identity branch is dominated by its centre tap
# (max/rms per output channel 10-20 at init, vs 2-5 without identity), so per-channel 8-bit
# steps are coarse for every other tap -- exactly the RepVGG PTQ failure RepQ is about -- and a
# random deep RepVGG amplifies small perturbations (~10x over repvgg_a0). The weight error of
# prepare equals an independent per-channel rounding of merge(model)'s kernels (_ptq_merged).
def test_w8a8_close_to_float_net(net32: nn.Module) -> None:
    x = _input(1, batch=8, spatial=(28, 28), seed=40, dtype=torch.float32)
    e8, w8 = _quant_errors(net32, _net_batches(4), x, 8)
    e4, _ = _quant_errors(net32, _net_batches(4), x, 4)
    with torch.no_grad():
        oracle = _rel_l2(_ptq_merged(net32, x, 8), net32(x))
    print(f"\nRepVGGNet 1x28x28 rel. L2 error vs float: W8A8 {e8:.4f} (W8 only {w8:.4f}, "
          f"PTQ oracle {oracle:.4f}), W4A4 {e4:.4f}")
    assert abs(w8 - oracle) <= 1e-3
    assert e8 < 0.10
    assert e4 > e8


def test_w8a8_timm_repvgg_a0() -> None:
    timm = pytest.importorskip("timm")
    batches = [_input(3, batch=4, spatial=TIMM_SPATIAL, seed=50 + i, dtype=torch.float32) for i in range(3)]
    x = _input(3, batch=4, spatial=TIMM_SPATIAL, seed=60, dtype=torch.float32)
    # Stem and first stage: the W8A8 / W4A4 figures.
    head = _calibrated(lambda: timm.create_model("repvgg_a0", pretrained=False, features_only=True,
                                                 out_indices=(1,)), 3, spatial=TIMM_SPATIAL,
                       dtype=torch.float32, all_params=False, steps=2)
    e8, _ = _quant_errors(head, batches, x, 8, pick=lambda y: y[-1])
    e4, _ = _quant_errors(head, batches, x, 4, pick=lambda y: y[-1])
    # The whole network: the weight error is that of rounding the deploy kernels.
    model = _timm("repvgg_a0", dtype=torch.float32)
    full8, w8 = _quant_errors(model, batches, x, 8)
    with torch.no_grad():
        oracle = _rel_l2(_ptq_merged(model, x, 8), model(x))
    print(f"\nrepvgg_a0 stem+stage0 3x32x32 rel. L2 error: W8A8 {e8:.4f}, W4A4 {e4:.4f}; whole net: "
          f"W8A8 {full8:.4f}, W8 only {w8:.4f}, PTQ oracle {oracle:.4f}")
    assert e8 < 0.2
    assert e4 > e8
    assert math.isfinite(full8)
    assert abs(w8 - oracle) <= 0.01 * oracle + 1e-3


# ---------------------------------------------------------------------------
# 5. The generated code.
# ---------------------------------------------------------------------------

def _check_code(model: nn.Module) -> None:
    qmodel = repq_fx.prepare(model)
    report = repq_fx.explain(model)
    merged = report.merged
    assert merged
    code = qmodel.code
    convs = _weight_quantized_convs(qmodel)
    assert len(convs) == len(merged), code
    assert code.count("conv2d(") >= len(merged)
    assert len(re.findall(r"^ +\w+_merged_weight = ", code, flags=re.MULTILINE)) == len(merged), code
    for block in merged:
        base = (block.name or "block").replace(".", "_")
        assert f"{base}_merged_weight" in code, block.name
        wq = f"{block.name}.weight_fake_quant" if block.name else "weight_fake_quant"
        assert isinstance(qmodel.get_submodule(wq), WeightFakeQuant), wq
    assert "weight_fake_quant" in code
    # Every conv on the data path is one of the quantized merged convs: no branch convs remain
    # (BN batch statistics run inside branch_statistics; convs that compose kernels, e.g. OREPA's
    # and ECB's 1x1 -> kxk, act on parameters only).
    assert len(_data_path_convs(qmodel)) == len(convs), code


def test_code_net(net32: nn.Module) -> None:
    _check_code(net32)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: B.RepVGGBlock(8, 8), id="repvgg"),
    pytest.param(lambda: B.QARepVGGBlockV2(8, 8), id="qarep2"),
    pytest.param(lambda: B.OREPABlock(8, 16), id="orepa"),
    pytest.param(lambda: B.ECB(8, 8, with_idt=True), id="ecb"),
    pytest.param(lambda: nn.Sequential(B.ACBlock(3, 8), nn.ReLU(), B.DilatedReparamBlock(8, 7)), id="acb+dilated"),
])
def test_code_block(make: Callable[[], nn.Module]) -> None:
    _check_code(make())


def test_code_timm_repvgg_a0() -> None:
    timm = pytest.importorskip("timm")
    _check_code(timm.create_model("repvgg_a0", pretrained=False, num_classes=10))


# ---------------------------------------------------------------------------
# 6. state_dict round trip.
# ---------------------------------------------------------------------------

def test_load_float_state_dict(net32: nn.Module) -> None:
    qmodel = repq_fx.prepare(B.RepVGGNet())  # fresh weights
    result = qmodel.load_state_dict(net32.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys
    for key in result.missing_keys:
        owner = qmodel.get_submodule(key.rpartition(".")[0])
        assert isinstance(owner, (WeightFakeQuant, ActFakeQuant)), key
    repq_fx.disable_fake_quant(qmodel)
    x = _input(1, batch=2, spatial=(28, 28), seed=70, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(qmodel.eval()(x), net32(x), rtol=1e-4, atol=1e-5)


def test_saved_state_dict_reproduces_outputs(net32: nn.Module, net_calibrated: fx.GraphModule) -> None:
    qmodel = copy.deepcopy(net_calibrated)
    # One training step so that weights, BN stats and LSQ steps differ from any fresh init.
    qmodel.train()
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    out = qmodel(_input(1, batch=8, spatial=(28, 28), seed=80, dtype=torch.float32))
    F.cross_entropy(out, torch.arange(8) % 10).backward()
    opt.step()
    # A quantizer switched off must stay off after loading.
    first = fake_quantizers(qmodel)[0]
    first.enable(False)

    buf = io.BytesIO()
    torch.save(qmodel.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = repq_fx.prepare(net32)
    fresh.load_state_dict(state, strict=True)

    fresh_q = {n: m for n, m in fresh.named_modules() if isinstance(m, (WeightFakeQuant, ActFakeQuant))}
    orig_q = {n: m for n, m in qmodel.named_modules() if isinstance(m, (WeightFakeQuant, ActFakeQuant))}
    assert fresh_q.keys() == orig_q.keys()
    for n, q in orig_q.items():
        f = fresh_q[n]
        assert (f.bits, f.quant_min, f.quant_max) == (q.bits, q.quant_min, q.quant_max), n
        for attr in ("scale", "zero_point", "enabled", "initialized"):
            assert torch.equal(getattr(f, attr), getattr(q, attr)), f"{n}.{attr}"

    x = _input(1, batch=4, spatial=(28, 28), seed=81, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), qmodel.eval()(x))
        a, b = copy.deepcopy(fresh).train(), copy.deepcopy(qmodel).train()
        assert torch.equal(a(x), b(x))
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


# ---------------------------------------------------------------------------
# 7. torch.compile.
# ---------------------------------------------------------------------------

def test_torch_compile_matches_eager() -> None:
    # A small RepVGGNet (1 stage of 2 blocks, one with identity) keeps Dynamo's tracing time down.
    # With gradients on the prepared net is one graph (tests/test_compile.py checks that, fullgraph);
    # the no_grad forwards here break once per block (Dynamo cannot trace embed_add's in-place
    # branch sum, ctx.mark_dirty, outside autograd), so this compile is not fullgraph.
    net = _calibrated(lambda: B.RepVGGNet(widths=(8,), blocks_per_stage=2), 1, spatial=(28, 28),
                      dtype=torch.float32)
    qmodel = repq_fx.prepare(net)
    repq_fx.calibrate(qmodel, _net_batches(2))
    torch._dynamo.reset()
    try:
        _compare_compiled(qmodel)
    finally:
        torch._dynamo.reset()


def _compare_compiled(qmodel: fx.GraphModule) -> None:
    eager = copy.deepcopy(qmodel)
    compiled_model = copy.deepcopy(qmodel)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = _input(1, batch=4, spatial=(28, 28), seed=90, dtype=torch.float32)
    for train in (False, True):
        eager.train(train)
        compiled_model.train(train)
        with torch.no_grad():
            expected = eager(x)
            got = compiled(x)
        assert _rel_err(got, expected) <= 1e-5, f"train={train}"
    # Train mode updated the running statistics of the compiled model as in eager.
    errs = _state_err(compiled_model.state_dict(), eager.state_dict())
    assert max(errs.values()) <= 1e-5, {k: v for k, v in errs.items() if v > 1e-5}
    # Backward through the compiled model gives eager's gradients.
    r = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    (compiled(x) * r).sum().backward()
    (eager(x) * r).sum().backward()
    for (n, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6), n


# ---------------------------------------------------------------------------
# 9. Bad input.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"weight_bits": 1}, "weight_bits"),
    ({"act_bits": 9}, "act_bits"),
    ({"bn_mode": "x"}, "bn_mode"),
    ({"weight_quantizer": "foo"}, "weight_quantizer"),
    ({"act_quantizer": "foo"}, "act_quantizer"),
    ({"skip": "a"}, "skip"),
    ({"first_last_bits": 0}, "first_last_bits"),
    ({"per_channel": "yes"}, "per_channel"),
])
def test_bad_config_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(repq_fx.ConfigError, match=field) as info:
        repq_fx.QConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_config_is_frozen() -> None:
    config = repq_fx.QConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.weight_bits = 4  # type: ignore[misc]


def test_skip_unknown_module_is_named() -> None:
    with pytest.raises(repq_fx.ConfigError, match="nope"):
        repq_fx.prepare(B.RepVGGBlock(4, 4), repq_fx.QConfig(skip=("nope",)))


def test_calibrate_errors() -> None:
    qmodel = repq_fx.prepare(B.RepVGGBlock(4, 4))
    with pytest.raises(repq_fx.RepQError):
        repq_fx.calibrate(qmodel, [])
    with pytest.raises(repq_fx.NotPreparedError):
        repq_fx.calibrate(B.RepVGGBlock(4, 4), [torch.randn(1, 4, 5, 5)])
    with pytest.raises(repq_fx.RepQError):
        repq_fx.prepare(qmodel)
    with pytest.raises(repq_fx.ConfigError):
        repq_fx.prepare(B.RepVGGBlock(4, 4), config={"weight_bits": 4})  # type: ignore[arg-type]


def test_skip_stage_stays_float(net32: nn.Module) -> None:
    qmodel = repq_fx.prepare(net32, repq_fx.QConfig(skip=("stages.0",)))
    names = [n for n, m in qmodel.named_modules() if isinstance(m, (WeightFakeQuant, ActFakeQuant))]
    assert names
    assert not [n for n in names if n.startswith("stages.0.")], names
    assert any(n.startswith("stages.1.") for n in names)
    repq_fx.calibrate(qmodel, _net_batches(1))
    x = _input(1, batch=2, spatial=(28, 28), seed=100, dtype=torch.float32)
    with torch.no_grad():
        out = qmodel.eval()(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # Stage 0 is float: with the other quantizers off, the model is the original.
    repq_fx.disable_fake_quant(qmodel)
    with torch.no_grad():
        assert torch.allclose(qmodel(x), net32(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Regressions (bugs found while writing these tests).
# ---------------------------------------------------------------------------

def test_emitter_constants_are_not_confused() -> None:
    # Regression: Emitter.constant cached nodes by id(t) without keeping t alive. The algebra passes
    # it temporaries (masks, identity kernels, ...): once one was freed, CPython handed its id to the
    # next tensor and constant() returned the *old* node (ECB wrong every time, DBB and RepVGGNet
    # sometimes, or a shape mismatch).
    from repq_fx.passes.emit import Emitter

    gm = fx.symbolic_trace(nn.Identity())
    emitter = Emitter(gm)
    nodes = [(emitter.constant(torch.full((i + 1,), float(i))), i) for i in range(6)]
    for node, i in nodes:
        assert torch.equal(getattr(gm, node.target), torch.full((i + 1,), float(i))), node.target


def test_ecb_prepare_constants() -> None:
    # The same regression end to end: ECB's merged weight uses a dozen temporaries (Sobel/Laplacian
    # masks, identity kernels); before the fix at least one constant was confused in every run.
    make = lambda: B.ECB(8, 8, depth_multiplier=2.0, act_type="prelu", with_idt=True)
    block = _calibrated(make, 8)
    qmodel = _prepare_float(block)
    x = _input(8, seed=2)
    with torch.no_grad():
        assert _rel_err(qmodel(x), block(x)) <= REL_TOL


def test_dbb_train_backward() -> None:
    # Regression: the prepared graph reads the running statistics for DBB's pad value into
    # M(theta) (saved by autograd), then branch_statistics updates them in place; the weight
    # function now reads a clone, so backward works.
    make, channels = DBB.values
    block = _calibrated(make, channels, dtype=torch.float32)
    x = _input(channels, seed=31, dtype=torch.float32)
    copy.deepcopy(block).train()(x).square().sum().backward()  # the original trains
    qmodel = repq_fx.prepare(block).train()
    repq_fx.disable_fake_quant(qmodel)
    qmodel(x).square().sum().backward()
    block_params = [n for n, _ in block.named_parameters()]
    grads = dict(qmodel.named_parameters())
    assert all(grads[n].grad is not None and torch.isfinite(grads[n].grad).all() for n in block_params)


def test_calibrate_ignores_earlier_forwards(net32: nn.Module) -> None:
    # Regression: a float forward before calibrate (a sanity check, or a float warm-up with fake
    # quant off) left min_val/max_val set, and calibrate widened them instead of starting afresh
    # (the input step came out 100x too coarse). calibrate now resets every quantizer first.
    batches = _net_batches(2)
    clean = repq_fx.prepare(net32)
    repq_fx.calibrate(clean, batches)
    warmed = repq_fx.prepare(net32)
    repq_fx.disable_fake_quant(warmed)
    with torch.no_grad():
        warmed(100 * _input(1, batch=8, spatial=(28, 28), seed=200, dtype=torch.float32))
    repq_fx.enable_fake_quant(warmed)
    repq_fx.calibrate(warmed, batches)
    for (name, a), b in zip(clean.named_modules(), warmed.modules()):
        if isinstance(a, ActFakeQuant):
            assert torch.allclose(a.scale, b.scale), name
