"""Property tests of the affine-conv algebra (``repq_fx.algebra``) with hypothesis.

Random re-parametrized structures are described once, as a small tree of nodes. Each node
has two independent meanings:

* ``forward(x)``: the structure's own forward, built only from ``F.conv2d``,
  ``F.batch_norm`` (eval form), ``F.avg_pool2d``, padding by hand, ``torch.cat`` and sums;
* ``build()``: the same structure in the algebra (``ops``, ``compose``, ``add``, ``concat``).

Property 1 (exact structures): ``build()`` is a map, ``to_conv`` turns it into ONE conv, and
that conv run with ``F.conv2d`` equals ``forward`` within 1e-9 relative (float64).
Property 2 (non-exact structures): ``build()`` or ``to_conv`` is a ``NoMatch`` with a reason.

Tensor values come from a torch generator seeded by a drawn integer, so hypothesis only
draws (and shrinks) the structure and the seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repq_fx.algebra import AffineConv, ConvParams, NoMatch, add, apply, compose, concat, ops, to_conv

DT = torch.float64
REL_TOL = 1e-9
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ----------------------------------------------------------------------------- random values


class Rand:
    """Seeded float64 tensors (weights, biases, BN statistics, inputs)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g, dtype=DT)

    def uniform(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=self.g, dtype=DT)

    def away_from_zero(self, *shape: int) -> torch.Tensor:
        """Values with 0.5 <= |v| <= 1.5 (for biases that must be nonzero)."""
        sign = torch.randint(0, 2, shape, generator=self.g).to(DT) * 2 - 1
        return sign * self.uniform(0.5, 1.5, *shape)


# ----------------------------------------------------------------------------- structure nodes


def _conv_size(n: int, k: int, s: int, p0: int, p1: int, d: int) -> int | None:
    """Output length of a conv/pool window along one dim, or None if the input is too small."""
    span = n + p0 + p1 - d * (k - 1) - 1
    return span // s + 1 if span >= 0 else None


class Node:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def build(self) -> AffineConv | NoMatch:
        raise NotImplementedError

    def size(self, n: int, dim: int) -> int | None:
        """Output length along ``dim`` (0: H, 1: W) for input length ``n``; None if invalid."""
        return n


@dataclass
class Conv(Node):
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def build(self):
        return ops.conv(self.weight, self.bias, stride=self.stride, padding=self.padding,
                        dilation=self.dilation, groups=self.groups)

    def size(self, n, dim):
        p = self.padding[dim]
        return _conv_size(n, self.weight.shape[2 + dim], self.stride[dim], p, p, self.dilation[dim])


@dataclass
class BN(Node):
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float = 1e-5

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, training=False, eps=self.eps)

    def build(self):
        return ops.batch_norm(self.mean, self.var, self.weight, self.bias, self.eps)


@dataclass
class Identity(Node):
    channels: int
    groups: int | None  # None: ops.identity (diagonal); else ops.identity_conv laid out for groups

    def forward(self, x):
        return x

    def build(self):
        if self.groups is None:
            return ops.identity(self.channels, DT)
        return ops.identity_conv(self.channels, self.groups, DT)


@dataclass
class Scale(Node):
    scale: torch.Tensor

    def forward(self, x):
        return self.scale.reshape(1, -1, 1, 1) * x

    def build(self):
        return ops.diagonal(self.scale, None)


@dataclass
class AvgPool(Node):
    channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    ceil_mode: bool = False
    count_include_pad: bool = True

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    def build(self):
        return ops.avg_pool(self.channels, self.kernel, self.stride, self.padding, ceil_mode=self.ceil_mode,
                            count_include_pad=self.count_include_pad, divisor_override=None, dtype=DT)

    def size(self, n, dim):
        p = self.padding[dim]
        return _conv_size(n, self.kernel[dim], self.stride[dim], p, p, 1)


@dataclass
class Pad(Node):
    """Pad by ``(left, right, top, bottom)``.

    ``value=None``: zeros via ``F.pad`` (negative pads crop). Otherwise a per-channel value
    (DBB BNAndPadLayer), filled by hand (pads >= 0).
    """

    channels: int
    pads: tuple[int, int, int, int]
    value: torch.Tensor | None = None

    def forward(self, x):
        if self.value is None:
            return F.pad(x, self.pads)
        left, right, top, bottom = self.pads
        n, c, h, w = x.shape
        out = self.value.reshape(1, c, 1, 1).expand(n, c, h + top + bottom, w + left + right).clone()
        out[:, :, top:top + h, left:left + w] = x
        return out

    def build(self):
        m = ops.pad(self.channels, self.pads, 0.0, DT)
        return m if self.value is None else m.with_(pad_value=self.value)

    def size(self, n, dim):
        left, right, top, bottom = self.pads
        return n + (top + bottom if dim == 0 else left + right)


@dataclass
class Seq(Node):
    layers: Sequence[Node]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def build(self):
        m = self.layers[0].build()
        for layer in self.layers[1:]:
            if isinstance(m, NoMatch):
                return m
            nxt = layer.build()
            m = nxt if isinstance(nxt, NoMatch) else compose(nxt, m)
        return m

    def size(self, n, dim):
        for layer in self.layers:
            if n is None or n < 1:
                return None
            n = layer.size(n, dim)
        return n if n is not None and n >= 1 else None


@dataclass
class Sum(Node):
    branches: Sequence[Node]
    alphas: Sequence[float] = field(default_factory=list)

    def forward(self, x):
        alphas = self.alphas or [1.0] * len(self.branches)
        return sum(a * b.forward(x) for a, b in zip(alphas, self.branches))

    def build(self):
        maps = [b.build() for b in self.branches]
        bad = [m for m in maps if isinstance(m, NoMatch)]
        return bad[0] if bad else add(maps, list(self.alphas) or None)

    def size(self, n, dim):
        return self.branches[0].size(n, dim)


@dataclass
class Cat(Node):
    branches: Sequence[Node]

    def forward(self, x):
        return torch.cat([b.forward(x) for b in self.branches], dim=1)

    def build(self):
        maps = [b.build() for b in self.branches]
        bad = [m for m in maps if isinstance(m, NoMatch)]
        return bad[0] if bad else concat(maps)

    def size(self, n, dim):
        return self.branches[0].size(n, dim)


# ----------------------------------------------------------------------------- strategies

CHANNELS = st.sampled_from([1, 2, 3, 4, 6])
ODD = st.sampled_from([1, 3, 5, 7])
DILATION = st.integers(1, 3)
STRIDE = st.sampled_from([1, 2])
SEED = st.integers(0, 2**31 - 1)
#: padding (ph, pw) with at least one side > 0
SOME_PADDING = st.tuples(st.integers(0, 2), st.integers(0, 2)).map(lambda p: p if any(p) else (1, p[1]))


def divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


def groups_for(*channels: int) -> st.SearchStrategy[int]:
    return st.sampled_from(divisors(math.gcd(*channels)))


def make_bn(r: Rand, c: int, affine: bool = True) -> BN:
    return BN(r.normal(c), r.uniform(0.5, 1.5, c), r.normal(c) if affine else None,
              r.normal(c) if affine else None)


@st.composite
def maybe_bn(draw, r: Rand, node: Node, c: int) -> Node:
    """``node`` or ``node -> BN`` (affine or not)."""
    if not draw(st.booleans()):
        return node
    return Seq([node, make_bn(r, c, affine=draw(st.booleans()))])


@st.composite
def conv(draw, r: Rand, cin: int, cout: int, stride: int, *, padding: str = "same",
         bias: bool | None = None, kernel=None) -> Conv:
    """A random conv; padding 'same' (d*(k-1)//2 per dim), 'valid' (0) or 'any' (0 .. d*(k-1))."""
    kh, kw = kernel or (draw(ODD), draw(ODD))
    dh, dw = (draw(DILATION) if kh > 1 else 1), (draw(DILATION) if kw > 1 else 1)
    g = draw(groups_for(cin, cout))
    if bias is None:
        bias = draw(st.booleans())
    if padding == "same":
        pad = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    elif padding == "valid":
        pad = (0, 0)
    else:
        pad = (draw(st.integers(0, dh * (kh - 1))), draw(st.integers(0, dw * (kw - 1))))
    return Conv(r.normal(cout, cin // g, kh, kw), r.normal(cout) if bias else None,
                (stride, stride), pad, (dh, dw), g)


@st.composite
def conv_branch(draw, r, cin, cout, stride):
    """conv [-> BN] with 'same' padding."""
    return draw(maybe_bn(r, draw(conv(r, cin, cout, stride)), cout))


@st.composite
def identity_branch(draw, r, cin, cout, stride):
    """R2: identity or BN-only branch (stride 1, cin == cout)."""
    layout = draw(st.sampled_from([None] + divisors(cin)))
    return draw(maybe_bn(r, Identity(cin, layout), cin))


@st.composite
def avg_branch(draw, r, cin, cout, stride):
    """R9: AvgPool2d(k, s, k//2) (count_include_pad=False only without padding)."""
    kh, kw = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3, 5]))
    padding = (kh // 2, kw // 2)
    include = draw(st.booleans()) if padding == (0, 0) else True
    return AvgPool(cin, (kh, kw), (stride, stride), padding, count_include_pad=include)


@st.composite
def seq_1x1_kxk_branch(draw, r, cin, cout, stride):
    """R6: bias-free 1x1 -> 'same' zero-padded kxk [-> BN] (DBB 1x1-kxk without the inner BN)."""
    mid = draw(st.sampled_from(sorted({cin, cout, 2, 4})))
    first = draw(conv(r, cin, mid, 1, bias=False, kernel=(1, 1)))
    return draw(maybe_bn(r, Seq([first, draw(conv(r, mid, cout, stride))]), cout))


@st.composite
def seq_dbb_branch(draw, r, cin, cout, stride):
    """R6 (DBB/ECB): 1x1 [-> BN] -> pad with the response to a zero pixel -> valid kxk."""
    mid = draw(st.sampled_from(sorted({cin, cout, 2, 4})))
    head = draw(maybe_bn(r, draw(conv(r, cin, mid, 1, kernel=(1, 1))), mid))
    response = head.forward(torch.zeros(1, cin, 1, 1, dtype=DT)).reshape(-1)
    second = draw(conv(r, mid, cout, stride, padding="valid"))
    (dh, dw), (kh, kw) = second.dilation, second.weight.shape[2:]
    ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    return Seq([head, Pad(mid, (pw, pw, ph, ph), response), second])


@st.composite
def shifted_valid_branch(draw, r, cin, cout, stride):
    """R4 general offsets: F.pad with uneven (possibly negative) sides, then a valid conv on the same grid.

    Per dim the pads sum to d*(k-1), as 'same' padding does, but split at random (-1 .. d*(k-1)+1).
    """
    second = draw(conv(r, cin, cout, stride, padding="valid"))
    (dh, dw), (kh, kw) = second.dilation, second.weight.shape[2:]
    top, left = draw(st.integers(-1, dh * (kh - 1) + 1)), draw(st.integers(-1, dw * (kw - 1) + 1))
    pads = (left, dw * (kw - 1) - left, top, dh * (kh - 1) - top)
    return draw(maybe_bn(r, Seq([Pad(cin, pads), second]), cout))


@st.composite
def parallel_block(draw, r: Rand, cin: int, cout: int, stride: int) -> Node:
    """1-4 branches on one grid, each optionally negated or scaled per channel; optional post-BN."""
    kinds = [conv_branch, conv_branch, seq_1x1_kxk_branch, seq_dbb_branch, shifted_valid_branch]
    if cin == cout:
        kinds.append(avg_branch)
        if stride == 1:
            kinds += [identity_branch, identity_branch]
    branches, alphas = [], []
    for _ in range(draw(st.integers(1, 4))):
        branch = draw(draw(st.sampled_from(kinds))(r, cin, cout, stride))
        modifier = draw(st.sampled_from(["plain", "minus", "scale"]))
        if modifier == "scale":
            branch = Seq([branch, Scale(r.normal(cout))])
        branches.append(branch)
        alphas.append(-1.0 if modifier == "minus" else 1.0)
    return draw(maybe_bn(r, Sum(branches, alphas), cout))


@st.composite
def exact_parallel(draw):
    """A parallel block, or the concat of two, with an input of random (possibly tiny) size."""
    r = Rand(draw(SEED))
    cin, stride = draw(CHANNELS), draw(STRIDE)
    cout = draw(st.sampled_from([cin, cin, 2 * cin, 3]))
    node = draw(parallel_block(r, cin, cout, stride))
    if draw(st.booleans()):
        node = Cat([node, draw(parallel_block(r, cin, draw(st.sampled_from([cin, 2])), stride))])
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    return node, r.normal(draw(st.integers(1, 2)), cin, h, w)


@st.composite
def exact_chain(draw):
    """A sequential chain (R6, R7, valid kxk -> kxk, separable 1xk -> kx1, crops) [-> BN] [-> 1x1], with strides."""
    r = Rand(draw(SEED))
    cin, mid, cout = draw(CHANNELS), draw(CHANNELS), draw(CHANNELS)
    kind = draw(st.sampled_from(["1x1->kxk", "1x1->pad->kxk", "kxk->1x1", "kxk->kxk", "1xk->kx1"]))
    if kind == "1x1->kxk":  # zero-padded kxk after a bias-free 1x1
        layers = [draw(conv(r, cin, mid, 1, bias=False, kernel=(1, 1))),
                  draw(conv(r, mid, cout, draw(STRIDE), padding="any"))]
    elif kind == "1xk->kx1":  # separable: bias-free 1xk (or kx1), then the other, both zero-padded
        k1, k2 = (1, draw(ODD)), (draw(ODD), 1)
        if draw(st.booleans()):
            k1, k2 = k1[::-1], k2[::-1]
        layers = [draw(conv(r, cin, mid, 1, bias=False, padding="any", kernel=k1)),
                  draw(conv(r, mid, cout, draw(STRIDE), padding="any", kernel=k2))]
    elif kind == "1x1->pad->kxk":  # bias-valued padding (random per side), then a valid kxk
        head = draw(maybe_bn(r, draw(conv(r, cin, mid, 1, kernel=(1, 1))), mid))
        response = head.forward(torch.zeros(1, cin, 1, 1, dtype=DT)).reshape(-1)
        pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
        layers = [head, Pad(mid, pads, response), draw(conv(r, mid, cout, draw(STRIDE), padding="valid"))]
    else:  # kxk -> [crop] -> 1x1 or valid kxk: the intermediate is never padded
        layers = [draw(maybe_bn(r, draw(conv(r, cin, mid, draw(STRIDE), padding="any")), mid))]
        if draw(st.booleans()):
            layers.append(Pad(mid, tuple(draw(st.integers(-2, 0)) for _ in range(4))))
        second = (1, 1) if kind == "kxk->1x1" else None
        layers.append(draw(conv(r, mid, cout, draw(STRIDE), padding="valid", kernel=second)))
    if draw(st.booleans()):
        layers.append(make_bn(r, cout, affine=draw(st.booleans())))
    if draw(st.booleans()):
        layers.append(draw(conv(r, cout, draw(CHANNELS), draw(STRIDE), kernel=(1, 1))))
    node = Seq(layers)
    sizes = [min_size(node, dim) for dim in range(2)]
    h, w = (draw(st.integers(m, m + 6)) for m in sizes)
    return node, r.normal(draw(st.integers(1, 2)), cin, h, w)


def min_size(node: Node, dim: int) -> int:
    """Smallest input length along ``dim`` for which every layer has an output."""
    n = 1
    while node.size(n, dim) is None:
        n += 1
    return n


# ----------------------------------------------------------------------------- checks


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| relative to max |ref|, floored at 1 (the floor only matters for ``x - x``)."""
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    return float((out - ref).abs().max()) / max(float(ref.abs().max()), 1.0)


def assert_exact(node: Node, x: torch.Tensor) -> None:
    """The algebra gives ONE conv, and ``F.conv2d`` with it equals the structure's own forward."""
    ref = node.forward(x)
    m = node.build()
    assert isinstance(m, AffineConv), f"exact structure refused: {m}"
    p = to_conv(m)
    assert isinstance(p, ConvParams), f"merged map is not one conv: {p}"
    assert all(v >= 0 for v in p.padding)
    out = F.conv2d(x, p.weight, p.bias, p.stride, p.padding, p.dilation, p.groups)
    assert rel_err(out, ref) <= REL_TOL, f"one conv: relative error {rel_err(out, ref):.3e}"
    assert rel_err(apply(m, x), ref) <= REL_TOL, "apply(map) differs from the forward"


@settings(max_examples=200, **SETTINGS)
@given(exact_parallel())
def test_parallel_blocks_merge_to_one_conv(case):
    """R1-R5, R8-R11 (+R6 inside branches): random parallel blocks and concats are one exact conv."""
    assert_exact(*case)


@settings(max_examples=150, **SETTINGS)
@given(exact_chain())
def test_sequential_chains_merge_to_one_conv(case):
    """R1, R6, R7, valid kxk -> kxk and separable 1xk -> kx1: random chains with strides are one exact conv."""
    assert_exact(*case)


# ----------------------------------------------------------------------------- non-exact structures


@st.composite
def padded_kxk_then_padded_kxk(draw, r):
    """R6 hazard: kxk (k > 1 in both dims, stride 1, padding <= same) [-> BN] -> kxk padded (k > 1)."""
    cin, mid, cout = draw(CHANNELS), draw(CHANNELS), draw(CHANNELS)
    k1 = (draw(st.sampled_from([3, 5])), draw(st.sampled_from([3, 5])))
    first = draw(conv(r, cin, mid, 1, padding="valid", kernel=k1))
    first.padding = tuple(draw(st.integers(0, d * (k - 1) // 2)) for d, k in zip(first.dilation, k1))
    second = draw(conv(r, mid, cout, draw(STRIDE), kernel=(draw(st.sampled_from([3, 5])),) * 2))
    second.padding = draw(SOME_PADDING)
    return Seq([draw(maybe_bn(r, first, mid)), second])


@st.composite
def biased_1x1_then_zero_padded_kxk(draw, r):
    """R6 hazard: 1x1 with a nonzero bias [-> BN] -> zero-padded kxk (k > 1 where padded).

    Half the time the 1x1 is depthwise with in == out (a per-channel scale and shift).
    """
    cin, mid, cout = draw(CHANNELS), draw(CHANNELS), draw(CHANNELS)
    if draw(st.booleans()):
        first = Conv(r.normal(cin, 1, 1, 1), None, (1, 1), (0, 0), (1, 1), cin)
        mid = cin
    else:
        first = draw(conv(r, cin, mid, 1, bias=True, kernel=(1, 1)))
    first.bias = r.away_from_zero(mid)
    head = draw(maybe_bn(r, first, mid))
    response = head.forward(torch.zeros(1, cin, 1, 1, dtype=DT)).reshape(-1)
    if float(response.abs().max()) < 1e-3:  # BN cancelled the bias: use the bare 1x1
        head = first
    second = draw(conv(r, mid, cout, draw(STRIDE), kernel=(3, 3)))
    second.padding = draw(SOME_PADDING)
    return Seq([head, second])


@st.composite
def misaligned_branches(draw, r):
    """R4 hazard: branches whose grids differ (3x3 p=1 + 3x3 p=0, off-by-one padding, even kernels)."""
    cin, cout, stride = draw(CHANNELS), draw(CHANNELS), draw(STRIDE)
    good = draw(conv_branch(r, cin, cout, stride))
    bad = draw(conv(r, cin, cout, stride))
    kind = draw(st.sampled_from(["pad+1", "pad-1", "even"]))
    dim = draw(st.integers(0, 1))
    pad, k = list(bad.padding), bad.weight.shape[2 + dim]
    if kind == "pad+1" or (kind == "pad-1" and pad[dim] == 0):
        pad[dim] += 1
    elif kind == "pad-1":
        pad[dim] -= 1
    else:  # an even kernel size has no 'same' padding
        shape = list(bad.weight.shape)
        shape[2 + dim] = k + 1
        bad.weight = r.normal(*shape)
        dilation = list(bad.dilation)
        dilation[dim] = 1  # odd dilation: d*(k_even - 1) is odd, so no padding centres it
        bad.dilation = tuple(dilation)
        pad[dim] = k // 2
    bad.padding = tuple(pad)
    branches = [good, draw(maybe_bn(r, bad, cout))]
    branches = draw(st.permutations(branches))
    return Cat(branches) if draw(st.booleans()) else Sum(branches)


@st.composite
def mixed_strides(draw, r):
    """R2/R3 hazard: branches with different strides (incl. an identity next to a stride-2 conv)."""
    c = draw(CHANNELS)
    strided = draw(conv_branch(r, c, c, 2))
    other = draw(st.sampled_from(["identity", "conv"]))
    second = Identity(c, None) if other == "identity" else draw(conv_branch(r, c, c, 1))
    return Sum(draw(st.permutations([strided, second])))


@st.composite
def inexact_avg_pool(draw, r):
    """R9 hazard: AvgPool2d with count_include_pad=False and padding, or ceil_mode=True.

    Alone, or next to a conv on the same grid (same kernel, stride and padding), so that the
    pool's own flags are the only reason to refuse.
    """
    c = draw(CHANNELS)
    k = draw(st.sampled_from([2, 3, 5]))
    if draw(st.booleans()):
        pool = AvgPool(c, (k, k), (1, 1), (max(1, k // 2),) * 2, count_include_pad=False)
    else:
        pool = AvgPool(c, (k, k), (2, 2), (0, 0), ceil_mode=True)
    if not draw(st.booleans()):
        return pool
    twin = draw(conv(r, c, c, pool.stride[0], padding="valid", kernel=pool.kernel))
    twin.dilation, twin.padding = (1, 1), pool.padding
    return Sum(draw(st.permutations([twin, pool])))


@st.composite
def inexact_case(draw):
    r = Rand(draw(SEED))
    kind = draw(st.sampled_from([padded_kxk_then_padded_kxk, biased_1x1_then_zero_padded_kxk,
                                 misaligned_branches, mixed_strides, inexact_avg_pool]))
    node = draw(kind(r))
    h, w = (draw(st.integers(m, m + 4)) for m in (min_size(node, 0), min_size(node, 1)))
    return node, r.normal(1, node_in_channels(node), h, w)


def node_in_channels(node: Node) -> int:
    while not isinstance(node, (Conv, Identity, AvgPool, Pad)):
        node = (getattr(node, "layers", None) or node.branches)[0]
    if isinstance(node, Conv):
        return node.weight.shape[1] * node.groups
    return node.channels


@settings(max_examples=300, **SETTINGS)
@given(inexact_case())
def test_inexact_structures_are_refused(case):
    """R4, R6, R9 hazards: the algebra (or to_conv) answers NoMatch with a non-empty reason.

    A 1x1 that is a per-channel scale and shift (depthwise, in == out) before a zero-padded kxk
    is still one affine map, with a nonzero input pad value: that map must be exact (via apply),
    and to_conv must refuse it.
    """
    node, x = case
    result = node.build()
    if isinstance(result, AffineConv):
        assert result.pad_value is not None, "only a nonzero pad value may make the map non-exact"
        assert rel_err(apply(result, x), node.forward(x)) <= REL_TOL
        result = to_conv(result)
    assert isinstance(result, NoMatch), f"non-exact structure accepted: {type(result).__name__}"
    assert not result and str(result).strip()
