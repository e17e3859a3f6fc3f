"""Capture: trace an unmodified model and canonicalize its graph.

>>> import torch.nn as nn
>>> gm = capture(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
>>> isinstance(gm, torch.fx.GraphModule)
True
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import CaptureError
from .canonicalize import canonicalize
from .norm import batch_norm, is_batch_norm
from .tracer import LeafTracer, register_leaf_module, trace


def capture(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None) -> fx.GraphModule:
    """Trace a deep copy of ``model``, canonicalize it, and record shapes if ``example_inputs`` are given."""
    gm = canonicalize(trace(model))
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


__all__ = ["capture", "canonicalize", "trace", "register_leaf_module", "LeafTracer", "batch_norm", "is_batch_norm"]
