"""Unit tests of the affine-conv algebra (``repq_fx.algebra``), one group per merge rule R1-R12.

Every merged map is checked against the forward of the ops it replaces, computed with
torch's own functions (``F.conv2d``, ``F.batch_norm`` in eval form, ``F.avg_pool2d``,
``F.pad``, ``torch.cat``, sums) in float64. The relative error, measured against
max |reference|, must be at most 1e-12. Each merged map is checked twice: as ONE
``F.conv2d`` with the parameters from ``to_conv``, and through ``apply`` (the map's own
definition). Refusals must be a ``NoMatch`` with a reason.
The rule numbers refer to docs/algebra.md.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repq_fx.algebra import (
    AffineConv, ConvParams, NoMatch, add, apply, compose, concat, ops, pair, to_conv, to_module,
)

DT = torch.float64
TOL = 1e-12


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (shapes must agree)."""
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    return float((out - ref).abs().max() / ref.abs().max())


def run_conv(p: ConvParams, x: torch.Tensor) -> torch.Tensor:
    """The one conv described by ``p``, run with torch's own conv."""
    return F.conv2d(x, p.weight, p.bias, p.stride, p.padding, p.dilation, p.groups)


def assert_merged(m: AffineConv | NoMatch, x: torch.Tensor, ref: torch.Tensor) -> ConvParams:
    """``m`` is a map, ``to_conv(m)`` is one zero-padded conv, and both compute ``ref``."""
    assert isinstance(m, AffineConv), f"expected a merged map, got NoMatch: {m}"
    p = to_conv(m)
    assert isinstance(p, ConvParams), f"expected one conv, got NoMatch: {p}"
    assert all(v >= 0 for v in p.padding), p.padding
    assert rel_err(run_conv(p, x), ref) <= TOL
    assert rel_err(apply(m, x), ref) <= TOL
    return p


def assert_refused(result: object, *words: str) -> NoMatch:
    """``result`` is a NoMatch whose reason mentions every word in ``words``."""
    assert isinstance(result, NoMatch), f"expected NoMatch, got {type(result).__name__}"
    assert str(result), "a NoMatch must say why"
    for w in words:
        assert w in str(result), (w, str(result))
    return result


class Conv:
    """A conv layer: its own forward (``F.conv2d``) and its algebra leaf (``ops.conv``).

    ``padding=None`` means 'same' padding ``d*(k-1)//2`` per dim.
    """

    def __init__(self, cin, cout, k, *, stride=1, padding=None, dilation=1, groups=1, bias=True):
        kh, kw = pair(k)
        self.dilation = pair(dilation)
        if padding is None:
            padding = (self.dilation[0] * (kh - 1) // 2, self.dilation[1] * (kw - 1) // 2)
        self.stride, self.padding, self.groups = pair(stride), pair(padding), groups
        self.weight = rand(cout, cin // groups, kh, kw)
        self.bias = rand(cout) if bias else None

    def __call__(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def op(self) -> AffineConv:
        return ops.conv(self.weight, self.bias, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.groups)


class BN:
    """An eval-mode BatchNorm2d with random running stats: ``F.batch_norm`` and ``ops.batch_norm``."""

    def __init__(self, c, affine=True, eps=1e-5):
        self.mean = rand(c)
        self.var = torch.rand(c, dtype=DT) + 0.5
        self.weight = rand(c) if affine else None
        self.bias = rand(c) if affine else None
        self.eps = eps

    def __call__(self, y):
        return F.batch_norm(y, self.mean, self.var, self.weight, self.bias, training=False, eps=self.eps)

    def op(self) -> AffineConv:
        return ops.batch_norm(self.mean, self.var, self.weight, self.bias, self.eps)


def fill_pad(u: torch.Tensor, pads: tuple[int, int, int, int], value: torch.Tensor) -> torch.Tensor:
    """Pad ``u`` by ``(left, right, top, bottom)`` with a per-channel value (by hand, not via F.pad)."""
    left, right, top, bottom = pads
    n, c, h, w = u.shape
    out = value.reshape(1, c, 1, 1).expand(n, c, h + top + bottom, w + left + right).clone()
    out[:, :, top:top + h, left:left + w] = u
    return out


def expected_identity(channels: int, groups: int, k: int) -> torch.Tensor:
    """R2 written out with loops: 1 at ``[o, o mod C/g, k//2, k//2]``."""
    q = channels // groups
    w = torch.zeros(channels, q, k, k, dtype=DT)
    for o in range(channels):
        w[o, o % q, k // 2, k // 2] = 1
    return w


# ----------------------------------------------------------------------------- R1


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_r1_bn_fold_after_conv(conv_bias, affine):
    """R1: conv -> BN (with/without conv bias, affine=False) is one conv with W*t, beta + (b - mu)*t."""
    x = rand(2, 3, 9, 8)
    conv, bn = Conv(3, 5, 3, bias=conv_bias), BN(5, affine=affine)
    p = assert_merged(compose(bn.op(), conv.op()), x, bn(conv(x)))
    gamma = torch.ones(5, dtype=DT) if bn.weight is None else bn.weight
    beta = torch.zeros(5, dtype=DT) if bn.bias is None else bn.bias
    t = gamma / torch.sqrt(bn.var + bn.eps)
    b = torch.zeros(5, dtype=DT) if conv.bias is None else conv.bias
    assert rel_err(p.weight, conv.weight * t.reshape(-1, 1, 1, 1)) <= TOL
    assert rel_err(p.bias, beta + (b - bn.mean) * t) <= TOL
    assert (p.stride, p.padding, p.groups) == ((1, 1), (1, 1), 1)


# ----------------------------------------------------------------------------- R2


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_r2_identity_branch_grouped(groups):
    """R2 + R3: kxk conv + identity for groups 1, 2 and C (depthwise); the kernel gains Id_g at the centre."""
    c = 4
    x = rand(2, c, 7, 6)
    conv = Conv(c, c, 3, groups=groups)
    p = assert_merged(add([conv.op(), ops.identity_conv(c, groups, DT)]), x, conv(x) + x)
    assert p.groups == groups
    assert torch.allclose(p.weight - conv.weight, expected_identity(c, groups, 3), rtol=0, atol=1e-14)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_r2_bn_only_identity_branch(groups):
    """R2 + R1: RepVGG's BN-only branch, conv->BN + BN(x), merged as fold(Id_g, BN)."""
    c = 4
    x = rand(2, c, 6, 7)
    conv, bn_conv, bn_id = Conv(c, c, 3, groups=groups, bias=False), BN(c), BN(c)
    m = add([compose(bn_conv.op(), conv.op()), compose(bn_id.op(), ops.identity(c, DT))])
    p = assert_merged(m, x, bn_conv(conv(x)) + bn_id(x))
    assert p.groups == groups


def test_r2_identity_into_dilated_target():
    """R2 + R4: identity into a dilated 3x3 (d=2, p=2) lands on the centre tap; stays dilated 3x3."""
    c = 4
    x = rand(1, c, 9, 10)
    conv = Conv(c, c, 3, dilation=2)
    p = assert_merged(add([conv.op(), ops.identity(c, DT)]), x, conv(x) + x)
    assert p.dilation == (2, 2) and tuple(p.weight.shape[2:]) == (3, 3) and p.padding == (2, 2)


# ----------------------------------------------------------------------------- R3


def test_r3_subtraction():
    """R3 with alpha = -1 (FastViT RepMixer: x + scale*(mixer(x) - norm(x)) style subtraction)."""
    x = rand(2, 4, 8, 8)
    a, b = Conv(4, 4, 3, groups=4), Conv(4, 4, 1, groups=4)
    assert_merged(add([a.op(), b.op()], [1.0, -1.0]), x, a(x) - b(x))


def test_r3_per_channel_scale():
    """R3 with a per-channel alpha, expressed as compose(ops.diagonal(scale, None), branch)."""
    x = rand(2, 3, 7, 9)
    a, b = Conv(3, 6, 3), Conv(3, 6, 1)
    sa, sb = rand(6), rand(6)
    m = add([compose(ops.diagonal(sa, None), a.op()), compose(ops.diagonal(sb, None), b.op()), ])
    ref = sa.reshape(1, -1, 1, 1) * a(x) + sb.reshape(1, -1, 1, 1) * b(x)
    assert_merged(m, x, ref)


def test_r3_scaled_identity_and_subtraction_together():
    """R3: LinearAddBlock style: 3x3*s3 + 1x1*s1 - x*s_id, mixing alphas and diagonal scales."""
    x = rand(1, 4, 6, 5)
    a, b = Conv(4, 4, 3), Conv(4, 4, 1)
    s3, s1, sid = rand(4), rand(4), rand(4)
    m = add([
        compose(ops.diagonal(s3, None), a.op()),
        compose(ops.diagonal(s1, None), b.op()),
        ops.diagonal(sid, None),
    ], [1.0, 1.0, -1.0])
    col = lambda v: v.reshape(1, -1, 1, 1)  # noqa: E731
    assert_merged(m, x, col(s3) * a(x) + col(s1) * b(x) - col(sid) * x)


# ----------------------------------------------------------------------------- R4


def test_r4_acb_asymmetric_kernels():
    """R4: ACB 3x3 + 1x3 + 3x1 (each with BN), per-dimension offsets into the 3x3."""
    x = rand(2, 3, 7, 8)
    sq, hor, ver = Conv(3, 4, 3, bias=False), Conv(3, 4, (1, 3), bias=False), Conv(3, 4, (3, 1), bias=False)
    assert hor.padding == (0, 1) and ver.padding == (1, 0)
    bns = [BN(4), BN(4), BN(4)]
    m = add([compose(bn.op(), c.op()) for bn, c in zip(bns, (sq, hor, ver))])
    ref = sum(bn(c(x)) for bn, c in zip(bns, (sq, hor, ver)))
    p = assert_merged(m, x, ref)
    assert tuple(p.weight.shape[2:]) == (3, 3) and p.padding == (1, 1)


def test_r4_different_kernels_and_paddings():
    """R4: 5x5 p=2 + 3x3 p=1 + 1x1 p=0 + dilated 3x3 (d=2, p=2): one 5x5 with padding 2."""
    x = rand(2, 4, 9, 7)
    convs = [Conv(4, 4, 5), Conv(4, 4, 3), Conv(4, 4, 1), Conv(4, 4, 3, dilation=2)]
    p = assert_merged(add([c.op() for c in convs]), x, sum(c(x) for c in convs))
    assert tuple(p.weight.shape[2:]) == (5, 5) and p.padding == (2, 2) and p.dilation == (1, 1)


def test_r4_off_centre_same_grid():
    """R4 general offset rule: an off-centre 3x3 (pads ((0,2),(0,2))) plus a 1x1 lands on tap (0, 0)."""
    x = rand(1, 2, 6, 7)
    w, b = rand(3, 2, 3, 3), rand(3)
    off = AffineConv(w, b, (1, 1), ((0, 2), (0, 2)), (1, 1), 1)
    one = Conv(2, 3, 1)
    ref = F.conv2d(F.pad(x, (0, 2, 0, 2)), w, b) + one(x)
    assert_merged(add([off, one.op()]), x, ref)


def test_r4_offsets_off_the_dilation_lattice():
    """R4: two dilated 3x3 (d=2) whose first taps differ by 1 (pads (2,2) and (1,3)) need a dense frame."""
    x = rand(2, 3, 8, 9)
    wa, wb = rand(4, 3, 3, 3), rand(4, 3, 3, 3)
    a = AffineConv(wa, None, (1, 1), ((2, 2), (2, 2)), (2, 2), 1)
    b = AffineConv(wb, rand(4), (1, 1), ((1, 3), (3, 1)), (2, 2), 1)
    ref = F.conv2d(F.pad(x, (2, 2, 2, 2)), wa, dilation=2) + F.conv2d(F.pad(x, (3, 1, 1, 3)), wb, b.bias, dilation=2)
    p = assert_merged(add([a, b]), x, ref)
    assert p.dilation == (1, 1)


def test_r4_acb_crop_path():
    """R4: ACB with padding 0 crops the input by k//2 - p before the 1x3 / 3x1 convs (ops.pad, negative pads)."""
    c = 3
    x = rand(2, c, 8, 9)
    sq = Conv(c, 4, 3, padding=0)
    hor, ver = Conv(c, 4, (1, 3), padding=0), Conv(c, 4, (3, 1), padding=0)
    crop_rows = ops.pad(c, (0, 0, -1, -1), 0.0, DT)
    crop_cols = ops.pad(c, (-1, -1, 0, 0), 0.0, DT)
    m = add([sq.op(), compose(hor.op(), crop_rows), compose(ver.op(), crop_cols)])
    ref = sq(x) + hor(x[:, :, 1:-1, :]) + ver(x[:, :, :, 1:-1])
    assert torch.equal(hor(F.pad(x, (0, 0, -1, -1))), hor(x[:, :, 1:-1, :]))  # F.pad crops the same rows
    p = assert_merged(m, x, ref)
    assert tuple(p.weight.shape[2:]) == (3, 3) and p.padding == (0, 0)


# ----------------------------------------------------------------------------- R5


def test_r5_group_expansion():
    """R5: a groups=4 branch plus a groups=2 branch is one conv with groups=gcd=2."""
    x = rand(2, 8, 6, 6)
    g4, g2 = Conv(8, 8, 3, groups=4), Conv(8, 8, 1, groups=2)
    p = assert_merged(add([g4.op(), g2.op()]), x, g4(x) + g2(x))
    assert p.groups == 2 and tuple(p.weight.shape) == (8, 4, 3, 3)


def test_r5_grouped_plus_dense():
    """R5: depthwise 3x3 + dense 1x1 expands to groups 1."""
    x = rand(1, 4, 5, 6)
    dw, pw = Conv(4, 4, 3, groups=4), Conv(4, 4, 1)
    p = assert_merged(add([dw.op(), pw.op()]), x, dw(x) + pw(x))
    assert p.groups == 1


# ----------------------------------------------------------------------------- R6


@pytest.mark.parametrize("groups", [1, 2])
def test_r6_1x1_then_kxk_zero_padded_no_bias(groups):
    """R6: bias-free 1x1 -> zero-padded 3x3 is exact (the 1x1's response to the zero padding is 0)."""
    x = rand(2, 4, 7, 8)
    first, second = Conv(4, 6, 1, bias=False, groups=groups), Conv(6, 5 * groups, 3, groups=groups)
    p = assert_merged(compose(second.op(), first.op()), x, second(first(x)))
    assert p.padding == (1, 1) and p.groups == groups


def test_r6_1x1_with_bias_then_zero_padded_kxk_refused():
    """R6: a nonzero 1x1 bias before a zero-padded 3x3 is a position-dependent bias: NoMatch."""
    x = rand(1, 3, 6, 6)
    first, second = Conv(3, 4, 1), Conv(4, 5, 3)
    assert_refused(compose(second.op(), first.op()), "not exact")
    # Premise: the interior-exact merge (valid composite + padding 1) is wrong at the border.
    valid_second = ops.conv(second.weight, second.bias, stride=1, padding=0, dilation=1, groups=1)
    valid = to_conv(compose(valid_second, first.op()))
    naive = F.conv2d(x, valid.weight, valid.bias, padding=1)
    ref = second(first(x))
    assert rel_err(naive[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1]) <= TOL
    assert rel_err(naive, ref) > 1e-3


def test_r6_1x1_with_bias_then_bias_valued_pad_then_valid_kxk():
    """R6 (ECB SeqConv3x3): 1x1 with bias b0, intermediate padded with b0, then a valid 3x3: exact."""
    x = rand(2, 3, 7, 6)
    first, second = Conv(3, 4, 1), Conv(4, 5, 3, padding=0)
    pad = ops.pad(4, (1, 1, 1, 1), 0.0, DT).with_(pad_value=first.bias)
    ref = second(fill_pad(first(x), (1, 1, 1, 1), first.bias))
    p = assert_merged(compose(second.op(), compose(pad, first.op())), x, ref)
    assert p.padding == (1, 1) and p.weight.shape[2:] == (3, 3)


@pytest.mark.parametrize("conv_bias", [False, True])
def test_r6_dbb_1x1_bn_pad_with_bn_response_then_valid_kxk(conv_bias):
    """R6 (DBB BNAndPadLayer): 1x1 -> BN -> pad with BN's response to a zero pixel -> 3x3 valid -> BN."""
    x = rand(2, 4, 6, 9)
    first, bn1, second, bn2 = Conv(4, 6, 1, bias=conv_bias), BN(6), Conv(6, 4, 3, padding=0, bias=False), BN(4)
    zero_pixel = torch.zeros(1, 4, 1, 1, dtype=DT)
    response = bn1(first(zero_pixel)).reshape(-1)
    ref = bn2(second(fill_pad(bn1(first(x)), (1, 1, 1, 1), response)))
    pad = ops.pad(6, (1, 1, 1, 1), 0.0, DT).with_(pad_value=response)
    m = compose(bn2.op(), compose(second.op(), compose(pad, compose(bn1.op(), first.op()))))
    p = assert_merged(m, x, ref)
    assert p.padding == (1, 1)


def test_r6_separable_1xk_then_kx1_padded_along_the_pointwise_dim():
    """R6 per dim: 1x3 (p=(0,1), no bias) -> 3x1 (p=(1,0)): the first is pointwise along the padded rows."""
    x = rand(2, 3, 7, 8)
    hor, ver = Conv(3, 4, (1, 3), bias=False), Conv(4, 5, (3, 1))
    p = assert_merged(compose(ver.op(), hor.op()), x, ver(hor(x)))
    assert p.weight.shape[2:] == (3, 3) and p.padding == (1, 1)
    # with a bias on the 1x3 the zero row padding is a position-dependent bias: refused ...
    biased = Conv(3, 4, (1, 3))
    assert_refused(compose(ver.op(), biased.op()), "not exact")
    # ... unless the rows are padded with that bias (then a valid 3x1)
    ver_valid = Conv(4, 5, (3, 1), padding=0)
    rows = ops.pad(4, (0, 0, 1, 1), 0.0, DT).with_(pad_value=biased.bias)
    ref = ver_valid(fill_pad(biased(x), (0, 0, 1, 1), biased.bias))
    assert_merged(compose(ver_valid.op(), compose(rows, biased.op())), x, ref)


def test_r6_sequence_padding_with_two_different_values_refused():
    """R6: columns padded with c by the first map, rows zero-padded by the second: no single pad value."""
    c = 3
    cols = ops.pad(c, (1, 1, 0, 0), 0.0, DT).with_(pad_value=torch.full((c,), 0.5, dtype=DT))
    assert_refused(compose(Conv(c, 2, (3, 1)).op(), cols), "not exact")
    # the same value on both sides is one consistent pad value (exact as a map, checked via apply)
    x = rand(1, c, 5, 6)
    rows = Conv(c, 2, (3, 1), padding=0)
    both = compose(rows.op(), compose(ops.pad(c, (0, 0, 1, 1), 0.0, DT).with_(pad_value=cols.pad_value), cols))
    assert isinstance(both, AffineConv)
    ref = rows(fill_pad(fill_pad(x, (1, 1, 0, 0), cols.pad_value), (0, 0, 1, 1), cols.pad_value))
    assert rel_err(apply(both, x), ref) <= TOL
    assert_refused(to_conv(both), "non-zero")


def test_r6_depthwise_1x1_with_bias_zero_pad_is_a_map_but_not_a_conv():
    """R6 edge: a diagonal first map turns the mismatch into a nonzero input pad value.

    The composite map is still exact (checked via apply), but to_conv must refuse it.
    """
    x = rand(1, 3, 5, 6)
    scale, shift = rand(3), rand(3)
    second = Conv(3, 4, 3)
    m = compose(second.op(), ops.diagonal(scale, shift))
    assert isinstance(m, AffineConv)
    ref = second(scale.reshape(1, -1, 1, 1) * x + shift.reshape(1, -1, 1, 1))
    assert rel_err(apply(m, x), ref) <= TOL
    assert_refused(to_conv(m), "non-zero")


# ----------------------------------------------------------------------------- R7


@pytest.mark.parametrize("with_bn", [False, True])
def test_r7_kxk_then_1x1(with_bn):
    """R7: 3x3 (p=1, bias) [-> BN] -> 1x1 (bias) is always exact."""
    x = rand(2, 3, 7, 7)
    first, bn, second = Conv(3, 5, 3), BN(5), Conv(5, 4, 1)
    mid = compose(bn.op(), first.op()) if with_bn else first.op()
    ref = second(bn(first(x)) if with_bn else first(x))
    p = assert_merged(compose(second.op(), mid), x, ref)
    assert p.padding == (1, 1) and p.weight.shape[2:] == (3, 3)


def test_r7_depthwise_multiplier_then_pointwise_is_dense():
    """R7 (OREPA dwsc2full): depthwise 3x3 with channel multiplier 2 -> dense 1x1 merges to a dense 3x3."""
    x = rand(2, 4, 8, 7)
    dw, pw = Conv(4, 8, 3, groups=4), Conv(8, 6, 1)
    p = assert_merged(compose(pw.op(), dw.op()), x, pw(dw(x)))
    assert p.groups == 1 and tuple(p.weight.shape) == (6, 4, 3, 3)


def test_r7_kxk_then_kxk_valid():
    """R7/R6: 3x3 valid -> 3x3 valid (and 3x3 p=1 -> 3x3 valid) is exact: one 5x5."""
    x = rand(2, 3, 9, 8)
    a, b = Conv(3, 4, 3, padding=0), Conv(4, 5, 3, padding=0)
    p = assert_merged(compose(b.op(), a.op()), x, b(a(x)))
    assert p.weight.shape[2:] == (5, 5) and p.padding == (0, 0)
    a_padded = Conv(3, 4, 3)
    p = assert_merged(compose(b.op(), a_padded.op()), x, b(a_padded(x)))
    assert p.weight.shape[2:] == (5, 5) and p.padding == (1, 1)


def test_r7_kxk_then_padded_kxk_refused():
    """R6 hazard: 3x3 -> 3x3 with padding on the intermediate is refused, with a reason saying 'not exact'."""
    x = rand(1, 2, 8, 8)
    a, b = Conv(2, 3, 3, bias=False), Conv(3, 2, 3, bias=False)
    assert_refused(compose(b.op(), a.op()), "not exact")
    # Premise: one 5x5 with padding 2 matches in the interior only.
    full = to_conv(compose(ops.conv(b.weight, None, stride=1, padding=0, dilation=1, groups=1), a.op()))
    naive, ref = F.conv2d(x, full.weight, None, padding=2), b(a(x))
    assert rel_err(naive[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2]) <= TOL
    assert rel_err(naive, ref) > 1e-3


def test_r7_strides_in_both_convs():
    """R7: strided first and second conv: 3x3 s2 p=1 -> 1x1 s2, and 3x3 s2 valid -> 3x3 s2 valid (stride 4)."""
    x = rand(2, 3, 13, 12)
    a, b = Conv(3, 4, 3, stride=2), Conv(4, 5, 1, stride=2)
    p = assert_merged(compose(b.op(), a.op()), x, b(a(x)))
    assert p.stride == (4, 4)
    a, b = Conv(3, 4, 3, stride=2, padding=0), Conv(4, 5, 3, stride=2, padding=0)
    p = assert_merged(compose(b.op(), a.op()), x, b(a(x)))
    assert p.stride == (4, 4) and p.weight.shape[2:] == (7, 7)


def test_r7_strided_conv_then_crop_then_conv():
    """R7 + crop: 3x3 s2 p=1 -> crop one row/col per side (F.pad negative) -> 3x3 valid s1 [-> 1x1]."""
    x = rand(2, 3, 15, 13)
    a, b, c = Conv(3, 4, 3, stride=2), Conv(4, 5, 3, padding=0), Conv(5, 2, 1)
    crop = ops.pad(4, (-1, -2, -2, -1), 0.0, DT)
    ref = c(b(F.pad(a(x), (-1, -2, -2, -1))))
    assert_merged(compose(c.op(), compose(b.op(), compose(crop, a.op()))), x, ref)


def test_r6_1x1_then_strided_padded_kxk():
    """R6 with the stride on the kxk: bias-free 1x1 -> 3x3 s2 p=1."""
    x = rand(2, 3, 9, 10)
    a, b = Conv(3, 4, 1, bias=False), Conv(4, 5, 3, stride=2)
    p = assert_merged(compose(b.op(), a.op()), x, b(a(x)))
    assert p.stride == (2, 2)


# ----------------------------------------------------------------------------- R8


def test_r8_concat():
    """R8: cat([3x3(x), 1x1(x)], dim=1) is one conv with the output channels stacked."""
    x = rand(2, 4, 7, 6)
    a, b = Conv(4, 3, 3), Conv(4, 5, 1, bias=False)
    p = assert_merged(concat([a.op(), b.op()]), x, torch.cat([a(x), b(x)], dim=1))
    assert p.out_channels == 8


def test_r8_concat_of_grouped_branches():
    """R8 + R5: concat of two grouped branches (groups 2) is exact (as a dense conv)."""
    x = rand(1, 4, 6, 6)
    a, b = Conv(4, 4, 3, groups=2), Conv(4, 2, 3, groups=2, bias=False)
    assert_merged(concat([a.op(), b.op()]), x, torch.cat([a(x), b(x)], dim=1))


# ----------------------------------------------------------------------------- R9


def _avg(c, k, s, p, *, ceil_mode=False, count_include_pad=True):
    return ops.avg_pool(c, k, s, p, ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                        divisor_override=None, dtype=DT)


@pytest.mark.parametrize("stride", [1, 2])
def test_r9_avgpool_count_include_pad(stride):
    """R9 (QARepVGGV2): 3x3 + 1x1 [+ identity] + AvgPool2d(3, s, 1) with count_include_pad=True."""
    c = 4
    x = rand(2, c, 9, 8)
    a, b = Conv(c, c, 3, stride=stride), Conv(c, c, 1, stride=stride, bias=False)
    branches = [a.op(), b.op(), _avg(c, 3, stride, 1)]
    ref = a(x) + b(x) + F.avg_pool2d(x, 3, stride, 1, count_include_pad=True)
    if stride == 1:
        branches.append(ops.identity(c, DT))
        ref = ref + x
    assert_merged(add(branches), x, ref)


def test_r9_avgpool_alone():
    """R9: a lone AvgPool2d(2, 2, 0) is a depthwise conv of 1/4s."""
    x = rand(1, 3, 7, 8)
    p = assert_merged(_avg(3, 2, 2, 0), x, F.avg_pool2d(x, 2, 2))
    assert torch.equal(p.weight, torch.full((3, 1, 2, 2), 0.25, dtype=DT))


def test_r9_avgpool_exclude_pad_with_padding_refused():
    """R9: count_include_pad=False with padding changes the border divisors: NoMatch."""
    x = rand(1, 2, 5, 5)
    assert_refused(_avg(2, 3, 1, 1, count_include_pad=False), "count_include_pad")
    a = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    b = F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
    assert rel_err(a, b) > 1e-3  # the premise: they really differ


def test_r9_avgpool_ceil_mode_refused():
    """R9: ceil_mode=True is refused."""
    assert_refused(_avg(2, 2, 2, 0, ceil_mode=True), "ceil_mode")


def test_r9_avgpool_exclude_pad_without_padding_exact():
    """R9: count_include_pad=False is harmless without padding."""
    x = rand(2, 3, 7, 9)
    assert_merged(_avg(3, 3, 2, 0, count_include_pad=False), x,
                  F.avg_pool2d(x, 3, 2, 0, count_include_pad=False))


def test_r9_divisor_override_refused():
    """R9: divisor_override is refused."""
    r = ops.avg_pool(2, 3, 1, 1, ceil_mode=False, count_include_pad=True, divisor_override=4, dtype=DT)
    assert_refused(r, "divisor_override")


# ----------------------------------------------------------------------------- R10


def test_r10_post_sum_bn():
    """R10 (QARepVGG, RepViT): BN after the sum of 3x3->BN, raw 1x1 and identity."""
    c = 4
    x = rand(2, c, 7, 8)
    a, bn_a, b, post = Conv(c, c, 3, bias=False), BN(c), Conv(c, c, 1), BN(c)
    m = compose(post.op(), add([compose(bn_a.op(), a.op()), b.op(), ops.identity(c, DT)]))
    assert_merged(m, x, post(bn_a(a(x)) + b(x) + x))


# ----------------------------------------------------------------------------- R11


def test_r11_unireplknet_dilated_branches():
    """R11 (UniRepLKNet K=7): DW 7x7->BN + DW (5,d1), (3,d2), (3,d3) each ->BN; one dense DW 7x7."""
    c = 4
    x = rand(2, c, 11, 10)
    origin, origin_bn = Conv(c, c, 7, groups=c, bias=False), BN(c)
    branches = []
    for k, r in [(5, 1), (3, 2), (3, 3)]:
        conv = Conv(c, c, k, dilation=r, padding=(r * (k - 1) + 1) // 2, groups=c, bias=False)
        branches.append((conv, BN(c)))
    m = add([compose(origin_bn.op(), origin.op())] + [compose(bn.op(), cv.op()) for cv, bn in branches])
    ref = origin_bn(origin(x)) + sum(bn(cv(x)) for cv, bn in branches)
    p = assert_merged(m, x, ref)
    assert p.groups == c and p.dilation == (1, 1) and p.weight.shape[2:] == (7, 7) and p.padding == (3, 3)


def test_r11_dilated_branch_alone_redilates_in_to_conv():
    """R11: a 3x3 d=3 plus a 5x5 d=1: taps land at 0, 3, 6 of a 7-wide dense kernel."""
    x = rand(1, 2, 9, 9)
    a, b = Conv(2, 2, 3, dilation=3, padding=3), Conv(2, 2, 7)
    p = assert_merged(add([a.op(), b.op()]), x, a(x) + b(x))
    assert p.weight.shape[2:] == (7, 7)
    delta = p.weight - b.weight
    assert torch.allclose(delta[:, :, ::3, ::3], a.weight, rtol=0, atol=1e-14)
    delta[:, :, ::3, ::3] = 0
    assert torch.allclose(delta, torch.zeros_like(delta), rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- R12

SOBEL_X = [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]
SOBEL_Y = [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]
LAPLACIAN = [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]


def _mask(c, rows):
    return torch.tensor(rows, dtype=DT).expand(c, 1, 3, 3).clone()


def test_r12_fixed_masks_with_learned_scale():
    """R12 (ECB): depthwise Sobel-x/Sobel-y/Laplacian masks times a per-channel scale plus bias, + a 3x3 + x."""
    c = 3
    x = rand(2, c, 8, 7)
    main = Conv(c, c, 3)
    ops_branches, ref = [main.op(), ops.identity(c, DT)], main(x) + x
    for rows in (SOBEL_X, SOBEL_Y, LAPLACIAN):
        mask, scale, bias = _mask(c, rows), rand(c), rand(c)
        ref = ref + F.conv2d(x, scale.reshape(-1, 1, 1, 1) * mask, bias, padding=1, groups=c)
        masked = ops.conv(mask, None, stride=1, padding=1, dilation=1, groups=c)
        ops_branches.append(compose(ops.diagonal(scale, bias), masked))
    assert_merged(add(ops_branches), x, ref)


def test_r12_ecb_sequential_mask_branch():
    """R12 + R6 (ECB conv1x1-sobelx): 1x1 (bias b0) -> pad with b0 -> DW scale*mask (valid) + bias."""
    c = 3
    x = rand(2, c, 6, 7)
    conv0 = Conv(c, c, 1)
    mask, scale, bias = _mask(c, SOBEL_X), rand(c), rand(c)
    y0 = fill_pad(conv0(x), (1, 1, 1, 1), conv0.bias)
    ref = F.conv2d(y0, scale.reshape(-1, 1, 1, 1) * mask, bias, groups=c)
    masked = compose(ops.diagonal(scale, bias), ops.conv(mask, None, stride=1, padding=0, dilation=1, groups=c))
    pad = ops.pad(c, (1, 1, 1, 1), 0.0, DT).with_(pad_value=conv0.bias)
    p = assert_merged(compose(masked, compose(pad, conv0.op())), x, ref)
    assert p.padding == (1, 1)


# ----------------------------------------------------------------------------- to_conv / to_module


@pytest.mark.parametrize("padding, dilation, stride", [
    (((0, 1), (2, 0)), (1, 1), (1, 1)),      # asymmetric
    (((1, 0), (0, 2)), (2, 1), (2, 1)),      # (p1 - p0) not a multiple of d: re-dilated
    (((2, 0), (1, 3)), (2, 2), (1, 2)),      # asymmetric, dilation kept
    (((-1, -2), (1, -1)), (1, 1), (1, 1)),   # crops become zero taps
    (((-1, -3), (-3, -1)), (2, 2), (1, 2)),  # crops with dilation: padding must stay on the lattice
])
def test_to_conv_makes_padding_symmetric(padding, dilation, stride):
    """to_conv: asymmetric / negative padding becomes a symmetric nn.Conv2d (to_module) with the same output."""
    x = rand(2, 3, 11, 12)
    m = AffineConv(rand(4, 3, 2, 3), rand(4), stride, padding, dilation, 1)
    p = to_conv(m)
    assert isinstance(p, ConvParams)
    module = to_module(p)
    assert isinstance(module, torch.nn.Conv2d) and module.padding == p.padding
    assert all(v >= 0 for v in module.padding)
    with torch.no_grad():
        out = module(x)
    assert rel_err(out, apply(m, x)) <= TOL
    # apply itself agrees with the definition via F.pad + F.conv2d
    (t, b), (l, r) = padding
    ref = F.conv2d(F.pad(x, (l, r, t, b)), m.weight, m.bias, stride, 0, dilation)
    assert rel_err(out, ref) <= TOL


def test_to_module_dtype_cast():
    """to_module(p, dtype) casts the parameters."""
    m = AffineConv(rand(2, 2, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    module = to_module(to_conv(m), torch.float32)
    assert module.weight.dtype == torch.float32 and torch.all(module.bias == 0)


def test_to_conv_refuses_nonzero_pad_value_at_borders():
    """to_conv: a nonzero pad value that the map reads cannot be one zero-padded conv."""
    w = rand(2, 3, 3, 3)
    m = AffineConv(w, None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1, torch.full((3,), 0.5, dtype=DT))
    assert_refused(to_conv(m), "non-zero")
    # The same value is harmless where the map never reads outside the image, and zeros are fine.
    assert isinstance(to_conv(m.with_(padding=((0, 0), (-1, 0)))), ConvParams)
    assert isinstance(to_conv(m.with_(pad_value=torch.zeros(3, dtype=DT))), ConvParams)


# ----------------------------------------------------------------------------- NoMatch


def test_nomatch_is_falsy_with_reason():
    """NoMatch: falsy, str() is the reason; real refusals carry a non-empty reason."""
    r = NoMatch("why not")
    assert not r and bool(r) is False and str(r) == "why not"
    a = Conv(2, 2, 3, padding=1).op()
    b = Conv(2, 2, 3, padding=0).op()
    refused = add([a, b])
    assert_refused(refused, "align")
    assert not refused
    assert isinstance(add([a, a]), AffineConv) and bool(add([a, a]))


def test_nomatch_branch_strides_differ():
    """R3/R4: branches with different strides are refused."""
    a, b = Conv(2, 2, 3, stride=1).op(), Conv(2, 2, 3, stride=2).op()
    assert_refused(add([a, b]), "stride")
    assert_refused(concat([a, b]), "stride")
