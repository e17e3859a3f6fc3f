"""Hostile and unusual inputs: each is handled exactly, kept as it is with a
reason in ``explain``, or refused with a :class:`repq_fx.RepQError` that names the problem.

The cases are ``repq_fx.testing.cases.CASES`` (the README table "What repq_fx handles / refuses" is
printed from the same list, and ``test_readme_table_is_current`` keeps the two in step):

- handled / kept as is: ``merge`` equals ``model.eval()`` (float64, relative error <= 1e-9);
  ``prepare`` with fake quant off equals the original in eval mode and in train mode (output
  with the same random numbers, and the state after the step); every conv-like op that is not
  merged has a reason in ``explain``; the input model is not modified.
- float16 / bfloat16 cannot be compared in float64: there the error against a float64 copy of
  the model must not exceed the original's own error (times a small factor).
- refused: ``merge`` and ``prepare`` raise the case's error, whose message contains its reason;
  ``explain`` raises it too or (NaN/Inf) reports it as a warning.

Below the generic checks are the details of single cases and the regression tests of the bugs
these cases found.
"""
from __future__ import annotations

import copy
import math
import pathlib
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repq_fx
from repq_fx.testing import cases as K
from repq_fx import errors as E
from repq_fx.capture import capture
from repq_fx.testing.blocks import RepVGGBlock
from repq_fx.patterns.blocks import find_blocks
from repq_fx.quant.fake_quant import fake_quantizers

REL_TOL = 1e-9
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _state_errors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per key of ``expected``: ``max|a - e| / max(max|e|, 1)`` (integers: 0 or inf)."""
    errs = {}
    for k, e in expected.items():
        a = actual[k]
        if not e.is_floating_point():
            errs[k] = 0.0 if torch.equal(a, e) else math.inf
        else:
            errs[k] = ((a.double() - e.double()).abs().max() / max(e.double().abs().max().item(), 1.0)).item()
    return errs


def _same_seed(fn, seed: int = 1234):
    torch.manual_seed(seed)
    return fn()


def _ids(cases):
    return [c.id for c in cases]


EXACT = [c for c in K.CASES if c.outcome in ("handled", "kept as is") and c.dtype == torch.float64]
LOW_PRECISION = [c for c in K.CASES if c.outcome in ("handled", "kept as is") and c.dtype != torch.float64]
KEPT = [c for c in K.CASES if c.outcome == "kept as is"]
REFUSED = [c for c in K.CASES if c.outcome == "refused"]


def test_every_case_has_a_known_outcome() -> None:
    assert len({c.id for c in K.CASES}) == len(K.CASES)
    for c in K.CASES:
        assert c.outcome in ("handled", "kept as is", "refused"), c.id
        assert (c.error is not None) == (c.outcome == "refused"), c.id
        assert c.reason or c.outcome == "handled", c.id


# ---------------------------------------------------------------------------
# Handled and kept as is: exact.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", EXACT, ids=_ids(EXACT))
def test_merge_is_exact(case: K.Case) -> None:
    model = K.build(case)
    before = _snapshot(model)
    x = K.example_input(case)

    merged = repq_fx.merge(model)

    assert isinstance(merged, fx.GraphModule) and not merged.training
    with torch.no_grad():
        assert _rel_err(merged(x), model(x)) <= REL_TOL
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()) and not model.training


@pytest.mark.parametrize("case", EXACT, ids=_ids(EXACT))
def test_prepare_without_fake_quant_equals_original(case: K.Case) -> None:
    model = K.build(case)
    before = _snapshot(model)
    x = K.example_input(case)

    qmodel = repq_fx.prepare(model)
    repq_fx.disable_fake_quant(qmodel)

    with torch.no_grad():
        assert _rel_err(qmodel.eval()(x), model(x)) <= REL_TOL
        ref = copy.deepcopy(model).train()
        qmodel.train()
        expected = _same_seed(lambda: ref(x))
        got = _same_seed(lambda: qmodel(x))
    assert _rel_err(got, expected) <= REL_TOL
    errs = _state_errors(qmodel.state_dict(), ref.state_dict())
    assert max(errs.values(), default=0.0) <= REL_TOL, {k: v for k, v in errs.items() if v > REL_TOL}
    ref.eval(), qmodel.eval()
    with torch.no_grad():  # after the step, both fold the same running statistics
        assert _rel_err(qmodel(x), ref(x)) <= REL_TOL
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()) and not model.training


def _conv_like(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.modules.conv._ConvNd)
    return node.op == "call_function" and node.target in _CONV_FUNCTIONS


@pytest.mark.parametrize("case", EXACT + LOW_PRECISION, ids=_ids(EXACT + LOW_PRECISION))
def test_explain_gives_a_reason_for_every_conv_it_does_not_merge(case: K.Case) -> None:
    model = K.build(case)
    report = repq_fx.explain(model)
    text = str(report)
    gm = capture(model)
    analysis = find_blocks(gm)
    merged = {n for b in analysis.blocks if b.merged for n in b.region.nodes}
    for block in analysis.blocks:
        if not block.merged:
            assert block.reason and block.reason in text, (block.name, text)
    for node in gm.graph.nodes:
        if _conv_like(gm, node) and node not in merged:
            assert node in analysis.notes, f"{node.name} is neither merged nor explained:\n{text}"
            assert analysis.notes[node] in text, text
    if case.outcome == "kept as is":
        assert case.reason in text, text
    else:
        assert all(b.merged for b in report.blocks) and not report.left_out, text


# ---------------------------------------------------------------------------
# float16 / bfloat16.
# ---------------------------------------------------------------------------

_EPS = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def _within_own_error(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """``ours`` is no further from ``exact`` than ``theirs`` (the original in low precision), up to 4x."""
    assert ours.dtype == dtype
    own = _rel_err(theirs, exact)
    assert _rel_err(ours, exact) <= 4 * own + 8 * _EPS[dtype], (_rel_err(ours, exact), own)


@pytest.mark.parametrize("case", LOW_PRECISION, ids=_ids(LOW_PRECISION))
def test_low_precision_merge(case: K.Case) -> None:
    model = K.build(case)
    exact = copy.deepcopy(model).double()
    x = K.example_input(case)

    merged = repq_fx.merge(model)

    assert {p.dtype for p in merged.parameters()} == {case.dtype}
    with torch.no_grad():
        _within_own_error(merged(x), model(x), exact(x.double()), case.dtype)


@pytest.mark.parametrize("case", LOW_PRECISION, ids=_ids(LOW_PRECISION))
def test_low_precision_prepare(case: K.Case) -> None:
    model = K.build(case)
    exact = copy.deepcopy(model).double()
    x = K.example_input(case)

    qmodel = repq_fx.prepare(model)

    assert {v.dtype for k, v in qmodel.state_dict().items() if k in model.state_dict()} == \
        {v.dtype for v in model.state_dict().values()}
    repq_fx.disable_fake_quant(qmodel)
    with torch.no_grad():
        _within_own_error(qmodel.eval()(x), model(x), exact(x.double()), case.dtype)
        ref, ref64 = copy.deepcopy(model).train(), copy.deepcopy(exact).train()
        _within_own_error(qmodel.train()(x), ref(x), ref64(x.double()), case.dtype)
    # fake quant on: calibrate and a training step run in low precision and stay finite
    repq_fx.enable_fake_quant(qmodel)
    repq_fx.calibrate(qmodel, [x, x + 0.1])
    opt = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
    qmodel.train()
    out = qmodel(x)
    assert out.dtype == case.dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in qmodel.parameters())


# ---------------------------------------------------------------------------
# Refused.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", REFUSED, ids=_ids(REFUSED))
@pytest.mark.parametrize("entry", ["merge", "prepare"])
def test_refused_with_a_clear_error(case: K.Case, entry: str) -> None:
    model = K.build(case)
    with pytest.raises(case.error) as info:
        getattr(repq_fx, entry)(model)
    err = info.value
    assert isinstance(err, repq_fx.RepQError)
    message = str(err)
    assert case.reason in message, message
    assert "what to do" in message.lower(), message
    # raised by repq_fx on purpose, not by something deep inside torch
    assert not isinstance(err.__cause__, (AssertionError, KeyError, IndexError))


@pytest.mark.parametrize("case", REFUSED, ids=_ids(REFUSED))
def test_explain_of_refused_model(case: K.Case) -> None:
    model = K.build(case)
    if issubclass(case.error, E.NonFiniteError):  # explain still describes the model, with a warning
        report = repq_fx.explain(model)
        assert any(case.reason in w for w in report.warnings), str(report)
        assert case.reason in str(report)
    else:
        with pytest.raises(case.error, match=case.reason):
            repq_fx.explain(model)


# ---------------------------------------------------------------------------
# Details of single cases.
# ---------------------------------------------------------------------------

def _case(case_id: str) -> K.Case:
    return next(c for c in K.CASES if c.id == case_id)


def test_shared_conv_trains_one_weight() -> None:
    # Both quantized blocks read the one shared conv weight: a step moves it once, with the sum of
    # both gradients, as in the original model.
    case = _case("shared-conv-sequential")
    model = K.build(case)
    x = K.example_input(case)
    qmodel = repq_fx.prepare(model)
    repq_fx.disable_fake_quant(qmodel)
    ref = copy.deepcopy(model).train()
    qmodel.train()
    ref(x).square().sum().backward()
    qmodel(x).square().sum().backward()
    grads = dict(qmodel.named_parameters())
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for name, p in ref.named_parameters():  # (the conv bias's gradient is ~0: BN removes it)
        assert torch.allclose(grads[name].grad, p.grad, rtol=REL_TOL, atol=REL_TOL * scale), name


def test_shared_block_quantizers_are_per_call() -> None:
    qmodel = repq_fx.prepare(K.build(_case("shared-block")))
    names = sorted(n for n, m in qmodel.named_modules() if "weight_fake_quant" in n)
    assert len(names) == 2, names  # one weight quantizer per call of the block


def test_loop_is_unrolled() -> None:
    case = _case("loop")
    report = repq_fx.explain(K.build(case))
    assert len(report.merged) == 3 and sum(b.num_convs for b in report.merged) == 3, str(report)


def test_channels_last_in_either_place() -> None:
    case = _case("channels-last")
    model = K.build(case)
    contiguous = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x = K.example_input(case)
    for m in (model, contiguous):
        merged = repq_fx.merge(m)
        with torch.no_grad():
            for inp in (x, x.contiguous()):
                assert _rel_err(merged(inp), contiguous(inp.contiguous())) <= REL_TOL


def test_no_conv_model_prepares_to_a_model_without_quantizers() -> None:
    case = _case("no-convs")
    qmodel = repq_fx.prepare(K.build(case))
    assert not fake_quantizers(qmodel)
    assert "no 2-d convolution" in str(repq_fx.explain(K.build(case)))
    with pytest.raises(repq_fx.NotPreparedError, match="nothing to quantize"):
        repq_fx.calibrate(qmodel, [K.example_input(case)])


def test_already_merged_merges_to_the_same_convs() -> None:
    model = K.randomized(RepVGGBlock(K.C, K.C))
    once = repq_fx.merge(model)
    twice = repq_fx.merge(once)
    convs = lambda gm: [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs(twice)) == len(convs(once)) == 1
    x = K.example_input(_case("already-merged"))
    with torch.no_grad():
        assert _rel_err(twice(x), model(x)) <= REL_TOL


def test_already_prepared_message_points_to_lower() -> None:
    qmodel = K.build(_case("already-prepared"))
    with pytest.raises(E.AlreadyPreparedError, match="lower"):
        repq_fx.merge(qmodel)


@pytest.mark.parametrize("where, name", [
    ("conv", "block.rbr_dense.conv.weight"),
    ("bn-bias", "block.rbr_1x1.bn.bias"),
    ("bn-weight", "block.rbr_identity.weight"),
    ("running-mean", "block.rbr_dense.bn.running_mean"),
    ("head", "head.weight"),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value_is_named(where: str, name: str, value: float) -> None:
    model = K.randomized(_BlockWithHead())
    params = dict(model.named_parameters())
    with torch.no_grad():
        (params[name] if name in params else model.get_buffer(name)).view(-1)[0] = value
    for entry in (repq_fx.merge, repq_fx.prepare):
        with pytest.raises(E.NonFiniteError, match=name.replace(".", r"\.")) as info:
            entry(model)
        assert isinstance(info.value, ValueError)
        kind = "NaN" if math.isnan(value) else "Inf"
        assert kind in str(info.value)


class _BlockWithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(K.C, K.C)
        self.head = nn.Linear(K.C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean((2, 3)))


def test_sync_batch_norm_prepares_without_warning() -> None:
    # one process: exactly BatchNorm; in a process group its statistics are synchronised
    # (tests/test_distributed.py checks them against one process on the whole batch)
    model = K.build(_case("sync-bn"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qmodel = repq_fx.prepare(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in qmodel.modules())


def test_drop_path_at_rate_zero_is_merged_through() -> None:
    # DropPath(0) / Dropout(0) are the identity: the whole block is one conv.
    for drop in (K.DropPath(0.0), nn.Dropout(0.0)):
        model = K.randomized(K.BranchWithStochasticOp(drop))
        report = repq_fx.explain(model)
        assert [b.num_convs for b in report.blocks] == [2], str(report)


# ---------------------------------------------------------------------------
# README.
# ---------------------------------------------------------------------------

def test_readme_table_is_current() -> None:
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert K.markdown_table() in readme, "README.md is out of date: paste the output of `python -m repq_fx.testing.cases`"


# ---------------------------------------------------------------------------
# Regressions (bugs these cases found).
# ---------------------------------------------------------------------------

def test_conv_with_input_dependent_weight_is_not_a_linear_op() -> None:
    # Regression: the rules' `if bad: return bad` never fired (NoMatch is falsy), so a conv whose
    # kernel depends on the input counted as linear and explain/merge/prepare died with an
    # AssertionError ("cannot evaluate placeholder x as a parameter").
    from repq_fx.patterns.linear_ops import linear_op, tensor_nodes
    gm = capture(K.DynamicConv())
    conv = next(n for n in gm.graph.nodes if n.target is F.conv2d)
    verdict = linear_op(conv, tensor_nodes(gm))
    assert not verdict and "depends on the input" in verdict.reason


def test_functional_conv_with_string_padding() -> None:
    # Regression: F.conv2d(x, w, padding="same") kept its keyword form and the conv rule's
    # 7-way unpacking raised ValueError from inside find_blocks.
    model = K.build(_case("functional-same-padding"))
    assert [b.num_convs for b in repq_fx.explain(model).merged] == [1]


def test_hook_on_a_conv_is_not_dropped() -> None:
    # Regression: canonicalization replaced a hooked Conv2d by F.conv2d on its weight, silently
    # dropping the hook (merge was off by the hook's factor 2, no warning).
    model = K.build(_case("conv-forward-hook"))
    x = K.example_input(_case("conv-forward-hook"))
    with torch.no_grad():
        assert _rel_err(repq_fx.merge(model)(x), model(x)) <= REL_TOL


def test_hook_on_the_model_is_not_dropped() -> None:
    # Regression: torch.fx traces the root's forward(), not its __call__, so the model's own
    # forward hooks vanished from the merged/prepared model (off by a factor 2). The FX front end
    # now refuses such a model; capture="auto" then falls back to torch.export, which keeps the hook.
    model = K.build(_case("root-forward-hook"))
    with pytest.raises(repq_fx.CaptureError, match="forward hook"):
        repq_fx.capture.trace(model)
    assert "torch.export" in str(repq_fx.explain(model))


def test_weight_norm_hook_parameters_train() -> None:
    # Regression: the deprecated hook-based weight_norm recomputes conv.weight in a pre-hook; after
    # canonicalization the prepared model read the stale tensor, and weight_g/weight_v got no gradient.
    case = _case("weight-norm-hook")
    qmodel = repq_fx.prepare(K.build(case))
    qmodel.train()(K.example_input(case)).square().sum().backward()
    grads = {n: p.grad for n, p in qmodel.named_parameters()}
    assert grads["0.0.weight_g"] is not None and grads["0.0.weight_v"] is not None


def test_spectral_norm_merge_is_exact() -> None:
    # Regression: tracing puts the copy in train mode, so reading a spectral_norm weight ran one more
    # power iteration and merge was off by ~1e-4; parametrized convs are now left as they are.
    model = nn.Sequential(K._conv_bn(), nn.ReLU(), K._conv_bn(k=1))
    nn.utils.parametrizations.spectral_norm(model[0][0])
    model = K.randomized(model)
    x = K.example_input(_case("weight-norm"))
    with torch.no_grad():
        assert _rel_err(repq_fx.merge(model)(x), model(x)) <= REL_TOL
    assert "parametrized" in str(repq_fx.explain(model))
