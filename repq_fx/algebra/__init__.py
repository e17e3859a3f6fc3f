"""Affine-conv algebra: every re-parametrization rule as plain tensor math (no FX here).

>>> from repq_fx.algebra import ops, compose, to_conv
>>> bn = ops.batch_norm(torch.zeros(4), torch.ones(4), torch.ones(4), torch.zeros(4), 0.0)
>>> conv = ops.conv(torch.ones(4, 4, 3, 3), None, stride=1, padding=1, dilation=1, groups=1)
>>> to_conv(compose(bn, conv)).padding
(1, 1)
"""
import torch  # noqa: F401  (doctest namespace)

from . import ops
from .affine import AffineConv, NoMatch, pair
from .combine import add, align, concat
from .compose import compose
from .evaluate import apply
from .finalize import ConvParams, to_conv, to_module

__all__ = [
    "AffineConv", "NoMatch", "ConvParams", "ops", "pair",
    "add", "align", "concat", "compose", "apply", "to_conv", "to_module",
]
