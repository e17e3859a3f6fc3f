"""How a batch from the user's data becomes the inputs of a model's ``forward`` (``repq_fx.calibrate``).

The rules, first match wins; ``k`` is the number of inputs ``forward`` requires (its positional
parameters without a default, read from its signature; at least 1):

1. a ``Tensor``: the one input, ``model(batch)``;
2. a ``dict``: keyword inputs, ``model(**batch)``; its keys must be parameters of ``forward``;
3. a tuple or list whose first item is a tuple, list or dict: ``(inputs, target, ...)`` from a
   ``DataLoader``, with the inputs packed in the first item (read by rule 2 or 4);
4. a tuple or list of at least ``k`` items: the first ``k`` are the positional inputs and the rest
   (targets, ...) are left out. So ``(input, target)`` for a one-input model, ``(x1, x2)`` or
   ``(x1, x2, target)`` for ``forward(self, x1, x2)``.

Anything else raises :class:`~repq_fx.errors.RepQError` naming what was received and what ``forward``
takes. Optional inputs (parameters with a default) are passed only by keyword (a dict) or packed
(rule 3): a positional item after the ``k`` required ones is a target, never an optional input.

>>> import torch, torch.nn as nn
>>> class Two(nn.Module):
...     def forward(self, image, depth, scale=1.0):
...         return image * scale + depth
>>> model, x = Two(), torch.ones(2)
>>> [forward_inputs(model, b)[0] for b in ((x, x), (x, x, "target"))] == [(x, x), (x, x)]
True
>>> forward_inputs(model, {"image": x, "depth": x, "scale": 2.0})
((), {'image': tensor([1., 1.]), 'depth': tensor([1., 1.]), 'scale': 2.0})
>>> forward_inputs(model, ((x, x), 3))[0] == (x, x)       # ((inputs), target)
True
>>> forward_inputs(nn.Identity(), (x, 7))                 # (input, target)
((tensor([1., 1.]),), {})
>>> forward_inputs(model, x)
Traceback (most recent call last):
  ...
repq_fx.errors.RepQError: a batch is a Tensor of shape [2], but Two.forward(image, depth, scale=1.0) needs 2 inputs: \
give each batch as a tuple (image, depth), optionally followed by targets, or a dict {'image': ..., 'depth': ...}
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .errors import RepQError

__all__ = ["forward_inputs", "describe_batch"]


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module whose ``forward`` defines the inputs: through DataParallel/DDP and torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _parameters(model: nn.Module) -> tuple[list[inspect.Parameter], bool, bool]:
    """``forward``'s named parameters (without ``self``), and whether it has ``*args`` / ``**kwargs``."""
    try:
        signature = inspect.signature(_unwrapped(model).forward)
    except (TypeError, ValueError):  # a builtin or C forward: one positional input, as most models
        return [inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD)], False, False
    kinds = [p.kind for p in signature.parameters.values()]
    named = [p for p in signature.parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, inspect.Parameter.VAR_POSITIONAL in kinds, inspect.Parameter.VAR_KEYWORD in kinds


def _required(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    return [p for p in params if p.default is p.empty and p.kind is not p.KEYWORD_ONLY]


def describe_batch(batch: Any) -> str:
    """A short description of ``batch`` for error messages.

    >>> describe_batch((torch.zeros(2, 3), [1, 2]))
    'a tuple of 2 items (Tensor of shape [2, 3], list of 2 items)'
    """
    if isinstance(batch, torch.Tensor):
        return f"a Tensor of shape {list(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        kind = type(batch).__name__
        inner = ", ".join(_short(b) for b in batch[:4]) + (", ..." if len(batch) > 4 else "")
        return f"a {kind} of {len(batch)} items ({inner})"
    return f"a {type(batch).__name__}"


def _short(item: Any) -> str:
    if isinstance(item, torch.Tensor):
        return f"Tensor of shape {list(item.shape)}"
    if isinstance(item, (tuple, list)):
        return f"{type(item).__name__} of {len(item)} items"
    if isinstance(item, Mapping):
        return f"dict with keys {sorted(map(str, item))}"
    return type(item).__name__


def _signature_text(model: nn.Module, params: list[inspect.Parameter]) -> str:
    def one(p: inspect.Parameter) -> str:
        return p.name if p.default is p.empty else f"{p.name}={p.default!r}"
    return f"{type(_unwrapped(model)).__name__}.forward({', '.join(one(p) for p in params)})"


def forward_inputs(model: nn.Module, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` such that ``model(*args, **kwargs)`` runs ``batch`` (rules in the module docstring)."""
    params, var_positional, var_keyword = _parameters(model)
    required = _required(params)
    k = max(1, len(required))
    text = _signature_text(model, params)
    if isinstance(batch, torch.Tensor):
        if k == 1:
            return (batch,), {}
        names = ", ".join(p.name for p in required)
        raise RepQError(f"a batch is {describe_batch(batch)}, but {text} needs {k} inputs: give each batch as a "
                        f"tuple ({names}), optionally followed by targets, or a dict "
                        f"{{{', '.join(repr(p.name) + ': ...' for p in required)}}}")
    if isinstance(batch, Mapping):
        return (), _keyword_inputs(batch, params, required, var_keyword, text)
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, Mapping):
            return (), _keyword_inputs(first, params, required, var_keyword, text)
        if isinstance(first, (tuple, list)):
            if len(first) >= k:
                return tuple(first), {}
            raise _too_few(model, batch, text, k, required, packed=True)
        if len(batch) >= k:
            return tuple(batch[:k]), {}
        raise _too_few(model, batch, text, k, required, packed=False)
    expected = ("a Tensor, a tuple (input, target, ...) or a dict of keyword inputs" if k == 1 else
                f"a tuple of {k} inputs (optionally followed by targets) or a dict of keyword inputs")
    raise RepQError(f"a batch is {describe_batch(batch)}; {text} takes {expected}")


def _keyword_inputs(batch: Mapping, params: list[inspect.Parameter], required: list[inspect.Parameter],
                    var_keyword: bool, text: str) -> dict[str, Any]:
    names = {p.name for p in params}
    unknown = sorted(str(key) for key in batch if key not in names)
    if unknown and not var_keyword:
        raise RepQError(f"a batch is a dict with keys {sorted(map(str, batch))}, but {text} takes no "
                        f"{', '.join(map(repr, unknown))}: give only forward's inputs as keys (put targets "
                        "outside, as a tuple (inputs_dict, target))")
    missing = [p.name for p in required if p.name not in batch]
    if missing:
        raise RepQError(f"a batch is a dict with keys {sorted(map(str, batch))}, but {text} also needs "
                        f"{', '.join(map(repr, missing))}")
    return dict(batch)


def _too_few(model: nn.Module, batch: Any, text: str, k: int, required: list[inspect.Parameter],
             packed: bool) -> RepQError:
    got = describe_batch(batch[0] if packed else batch)
    names = ", ".join(p.name for p in required)
    return RepQError(f"a batch is {describe_batch(batch)}{' whose inputs are ' + got if packed else ''}, but "
                     f"{text} needs {k} inputs: give each batch as a tuple ({names}), optionally followed "
                     "by targets, or a dict of keyword inputs")
