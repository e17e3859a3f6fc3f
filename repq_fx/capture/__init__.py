"""Capture: trace an unmodified model and canonicalize its graph.

Two front ends produce the same canonical graph: ``torch.fx`` symbolic tracing (the default,
BatchNorm kept as a leaf) and ``torch.export`` (:mod:`.export_frontend`, for models symbolic
tracing cannot follow: slice assignment, ``int()`` on shapes, branches on ``x.get_device()``).
``front_end="auto"`` tries FX first and falls back to export when tracing fails;
``gm.meta["repq_front_end"]`` says which one was used.

>>> import torch.nn as nn
>>> gm = capture(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
>>> isinstance(gm, torch.fx.GraphModule), gm.meta["repq_front_end"]
(True, 'fx')
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import CaptureError, ConfigError
from . import export_frontend as _export_frontend
from .canonicalize import canonicalize
from .modes import mode_difference, warn_training_branch
from ..ir import batch_norm, is_batch_norm
from .tracer import LeafTracer, register_leaf_module, trace


FRONT_ENDS = ("auto", "fx", "export")


def capture(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None, front_end: str = "auto",
            mode: str = "train") -> fx.GraphModule:
    """Capture a deep copy of ``model`` as a canonical graph; record shapes if ``example_inputs`` are given.

    ``front_end``: ``"fx"``, ``"export"`` or ``"auto"`` (FX, and export where FX fails). ``mode``: ``"eval"``
    for ``merge``/``explain``, which must capture the function ``model.eval()`` computes; ``"train"`` for
    ``prepare``, whose graph follows ``.train()``/``.eval()`` through its BatchNorm and dropout modules.
    Python branches on ``self.training`` beyond those cannot follow the mode in one graph: where the
    model takes one (the train-mode capture differs from the eval-mode one, :mod:`.modes`), the eval-mode
    path is captured, in ``"train"`` mode with a :class:`~repq_fx.errors.TrainingBranchWarning` naming where.
    """
    if not isinstance(front_end, str) or front_end not in FRONT_ENDS:
        raise ConfigError(f"capture must be one of {', '.join(map(repr, FRONT_ENDS))}; got {front_end!r}")
    if mode not in ("train", "eval"):
        raise AssertionError(f"mode must be 'train' or 'eval', got {mode!r}")
    if front_end == "export":
        return _capture_export(model, example_inputs, mode=mode)
    try:
        gm = _capture_fx(model, example_inputs, mode)
    except CaptureError as fx_error:
        if front_end == "fx" or isinstance(model, fx.GraphModule):
            raise
        inputs = _export_frontend.example_inputs_for(model, example_inputs) if example_inputs is not None else None
        unfilled = _export_frontend.unfilled_arguments(model, len(inputs) if inputs is not None else 1)
        if unfilled:  # export would bake these arguments' defaults into the graph: only on request
            raise CaptureError(f"{fx_error}\n(capture='auto' does not fall back to torch.export here: it would fix "
                               f"the arguments {', '.join(unfilled)} at their defaults; pass capture='export' "
                               "to do that)") from fx_error
        return _capture_export(model, example_inputs, mode=mode, fx_error=fx_error)
    gm.meta["repq_front_end"] = "fx"
    gm.meta["repq_capture_note"] = ""
    return gm


def _capture_export(model: torch.nn.Module, example_inputs: Sequence[Any] | None, *, mode: str,
                    fx_error: BaseException | None = None) -> fx.GraphModule:
    return _export_frontend.capture_export(model, example_inputs, mode=mode, fx_error=fx_error)


def _capture_fx(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None,
                mode: str = "train") -> fx.GraphModule:
    """Trace a deep copy of ``model``, canonicalize it, and record shapes if ``example_inputs`` are given.

    The train-mode trace (dropout written ``F.dropout(x, p, self.training)`` becomes a module that follows
    the mode), unless it differs from the eval-mode trace beyond dropout (:mod:`.modes`): then the
    eval-mode trace, with a warning for ``mode="train"`` (``prepare``: the train path is lost).
    """
    gm = canonicalize(trace(model, mode="train"))
    if not isinstance(model, fx.GraphModule):
        eval_gm = canonicalize(trace(model, mode="eval"))
        difference = mode_difference(gm, eval_gm)
        if difference:
            if mode == "train":
                warn_training_branch(type(model).__name__, difference)
            gm = eval_gm
    if example_inputs is not None:
        inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*inputs)
        except Exception as e:
            raise CaptureError(f"running the captured graph on example_inputs failed: {type(e).__name__}: {e}") from e
        finally:
            gm.train(was_training)
    return gm


__all__ = ["capture", "FRONT_ENDS", "canonicalize", "trace", "register_leaf_module", "LeafTracer", "batch_norm", "is_batch_norm"]
