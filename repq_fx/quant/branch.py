"""The affine conv map a BatchNorm inside a block reads: the contract between ``prepare`` and ``bn_stats``.

A BN inside a block normalizes ``branch(x)``, an affine conv map of the block input ``x``
(``algebra.AffineConv``). The prepared graph passes that map to the statistics functions as a
:class:`Branch`, a ``NamedTuple`` with ``AffineConv``'s fields by name: FX writes a NamedTuple
into the generated code (``Branch(weight, None, (1, 1), ...)``) and deep-copies and pickles it
with the graph, which it does not do for a dataclass. The fields are checked against
``AffineConv``'s on import, so the two cannot drift apart.

>>> branch = Branch(torch.ones(2, 1, 1, 1), None, (1, 1), ((0, 0), (0, 0)), (1, 1), 2)
>>> branch.affine().is_diagonal(), IDENTITY.weight is None
(True, True)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import torch  # noqa: F401  (doctest namespace)

from ..algebra import AffineConv

Pads = tuple[tuple[int, int], tuple[int, int]]


class Branch(NamedTuple):
    """``AffineConv``'s fields; ``weight`` ``None`` is the identity (the BN reads ``x`` itself)."""

    weight: Any
    bias: Any
    stride: tuple[int, int]
    padding: Pads
    dilation: tuple[int, int]
    groups: int
    pad_value: Any = None

    @classmethod
    def of(cls, conv: AffineConv | None, convert: Callable[[Any], Any] = lambda v: v) -> "Branch":
        """The branch of ``conv`` (``None``: the identity), each field passed through ``convert``
        (``prepare`` turns symbolic values into their graph nodes).

        >>> Branch.of(None) == IDENTITY
        True
        """
        if conv is None:
            return IDENTITY
        return cls(*(convert(getattr(conv, name)) for name in cls._fields))

    def affine(self) -> AffineConv:
        """The map as an ``AffineConv`` (for a branch with a weight; see the module's example)."""
        return AffineConv(*self)


IDENTITY = Branch(None, None, (1, 1), ((0, 0), (0, 0)), (1, 1), 1, None)

if Branch._fields != tuple(f.name for f in dataclasses.fields(AffineConv)):
    raise AssertionError(f"Branch fields {Branch._fields} no longer follow AffineConv's")

# a statistics call as graphs saved before Branch existed wrote it: (x, *Branch's fields, bn, mode, moments)
LEGACY_ARGS = 1 + len(Branch._fields) + 3


def from_legacy(args: tuple) -> tuple:
    """``(x, branch, bn, mode, moments)`` of a statistics call a graph saved by an earlier version makes with the
    branch's fields spread out (``torch.load`` of a prepared model keeps its generated code).

    >>> x, branch, bn, mode, moments = from_legacy(("x", *IDENTITY, "bn", "batch", None))
    >>> branch == IDENTITY, mode
    (True, 'batch')
    """
    fields = len(Branch._fields)
    return (args[0], Branch(*args[1:1 + fields]), *args[1 + fields:])


__all__ = ["Branch", "IDENTITY", "Pads", "LEGACY_ARGS", "from_legacy"]
