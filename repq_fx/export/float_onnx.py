"""Float ONNX of a (merged) model: the baseline the int8 QDQ model is compared with.

>>> import tempfile, os, torch, torch.nn as nn
>>> path = os.path.join(tempfile.mkdtemp(), "float.onnx")
>>> export_float(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), (torch.randn(1, 1, 8, 8),), path)
>>> os.path.getsize(path) > 0
True
"""
from __future__ import annotations

import warnings

import torch


def export_float(model: torch.nn.Module, example_inputs: tuple, path: str) -> None:
    """``torch.onnx.export`` (dynamo) of ``model`` in eval mode to one self-contained file, input
    ``"input"`` with a dynamic batch, output ``"output"`` (the names ``export_onnx`` uses too)."""
    from .onnx_qdq import batched_example

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a batch of 2: torch.export specializes a dimension of size 1 ("Invalid ranges [2:1]" on convnext)
        torch.onnx.export(model.eval(), batched_example(tuple(example_inputs)), path, input_names=["input"],
                          output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                          external_data=False, verbose=False)


__all__ = ["export_float"]
