"""Decisions the algebra takes from the values of tensors, recorded so that a caller can check them.

Almost every rule depends on shapes only. A few compare values: is the value an intermediate
is padded with the response of the map before it (DBB's BN-valued pad, ECB's bias-valued pad),
do two branches pad with the same value, is a pad value zero, has a 1x1 scale no zero entry.
For a snapshot (``merge``) the current values decide. A model that trains (``prepare``) needs the
answer for every value its parameters can take: a bias that is exactly zero now stops being
zero after one step. ``recording`` collects each decision with the values it compared, so the
caller can take the same decisions on other values of the parameters (``patterns.blocks``
does, on random ones) and keep only the answers that do not depend on them.

>>> import torch
>>> with recording() as seen:
...     decide("equal", "pad values agree", True, torch.zeros(2))
True
>>> [(d.kind, d.question, d.answer) for d in seen]
[('equal', 'pad values agree', True)]
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

#: the kinds of decision: an equality of two expressions (a random point certifies an identity), or
#: that no entry of a tensor is zero (true for random values, false for some: never certified)
KINDS = ("equal", "nonzero")


@dataclass(frozen=True)
class Decision:
    """One answer the algebra took from values (``subject``: the graph node it was taken for, if known)."""

    kind: str
    question: str
    answer: bool
    operands: tuple[Any, ...]
    subject: Any = None


_LOG: ContextVar[list[Decision] | None] = ContextVar("repq_fx_decisions", default=None)
_SUBJECT: ContextVar[Any] = ContextVar("repq_fx_decision_subject", default=None)


@contextmanager
def recording() -> Iterator[list[Decision]]:
    """Collect the decisions taken inside the ``with`` block (nested blocks collect their own)."""
    log: list[Decision] = []
    token = _LOG.set(log)
    try:
        yield log
    finally:
        _LOG.reset(token)


@contextmanager
def about(subject: Any) -> Iterator[None]:
    """Decisions taken inside the block concern ``subject`` (a graph node).

    >>> with recording() as seen, about("conv2d_1"):
    ...     _ = decide("equal", "same pad value", False)
    >>> seen[0].subject
    'conv2d_1'
    """
    token = _SUBJECT.set(subject)
    try:
        yield
    finally:
        _SUBJECT.reset(token)


def decide(kind: str, question: str, answer: bool, *operands: Any) -> bool:
    """Record that ``question`` was answered ``answer`` from the values ``operands``; returns ``answer``.

    Outside ``recording`` nothing is kept:

    >>> decide("nonzero", "no zero scale", True, torch.ones(3))
    True
    """
    if kind not in KINDS:
        raise AssertionError(f"unknown decision kind {kind!r}")
    log = _LOG.get()
    if log is not None:
        log.append(Decision(kind, question, answer, tuple(_detached(o) for o in operands), _SUBJECT.get()))
    return answer


_CONCRETE: dict[type, Callable[[Any], Any]] = {}  # symbolic value type -> its current number


def register_concrete(kind: type, value_of: Callable[[Any], Any]) -> None:
    """Values of type ``kind`` stand for numbers the algebra can decide on: ``value_of(v)`` is that
    number. The algebra runs on tensors and on symbolic values alike (``passes.emit`` registers its
    own); a decision needs the number now.

    >>> class Boxed:
    ...     def __init__(self, t): self.t = t
    >>> register_concrete(Boxed, lambda b: b.t)
    >>> concrete(Boxed(torch.ones(1))), concrete(torch.zeros(1))
    (tensor([1.]), tensor([0.]))
    >>> del _CONCRETE[Boxed]
    """
    _CONCRETE[kind] = value_of


def concrete(x: Any) -> Any:
    """The number ``x`` stands for now: ``x`` itself unless its type was registered (``register_concrete``)."""
    value_of = _CONCRETE.get(type(x))
    return x if value_of is None else value_of(x)


def _detached(x: Any) -> Any:
    x = concrete(x)
    return x.detach() if isinstance(x, torch.Tensor) else x


def disagreement(current: list[Decision], other: list[Decision]) -> Decision | None:
    """The first decision of ``current`` that does not hold for the values ``other`` was taken on.

    ``other`` is the same evaluation on other values of the trainable tensors. An answer holds for
    every value when both runs give it and, for ``"nonzero"`` (true for almost every value, false
    for some), when the operands did not change: they do not depend on the trainable tensors.

    >>> now = [Decision("equal", "pad value is the response", True, (torch.zeros(2),))]
    >>> moved = [Decision("equal", "pad value is the response", False, (torch.ones(2),))]
    >>> disagreement(now, moved).question, disagreement(now, now)
    ('pad value is the response', None)
    """
    for i, mine in enumerate(current):
        if i >= len(other):
            return mine
        theirs = other[i]
        if (mine.kind, mine.question, mine.answer) != (theirs.kind, theirs.question, theirs.answer):
            return mine
        if mine.kind == "nonzero" and mine.answer and not _same_operands(mine.operands, theirs.operands):
            return mine
    return None


def _same_operands(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or not torch.equal(x.double(), y.double()):
                return False
        elif x != y:
            return False
    return len(a) == len(b)
