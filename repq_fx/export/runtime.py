"""ONNX Runtime helpers shared by the demo and the CLI: a CPU session, and the ops ORT really runs.

Every session keeps int8 QDQ activations as int8 (``session.qdqisint8allowed``): by default ONNX
Runtime on x86 rewrites them to uint8 with zero point 128, whose u8s8 kernels saturate 16-bit pair
sums without VNNI; kept signed (``|x| <= 128``), its s8s8 kernels are exact with weights in
[-127, 127] (the ``"tensorrt"`` target). Files with uint8 activations are not affected.

>>> import tempfile, os, torch, torch.nn as nn, repq_fx
>>> qmodel = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
>>> _ = repq_fx.calibrate(qmodel, [torch.randn(2, 3, 8, 8)])
>>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
>>> _ = repq_fx.export_onnx(repq_fx.lower(qmodel), (torch.randn(1, 3, 8, 8),), path)
>>> optimized_ops(path)["QLinearConv"]
1
"""
from __future__ import annotations

import collections
import tempfile


def session(model: str | bytes, threads: int = 1):
    """A CPU ``onnxruntime.InferenceSession`` of a file (or a serialized model held in memory) with ``threads``
    intra-op threads, quiet."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    _keep_int8(options)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def optimized_ops(path: str) -> collections.Counter:
    """Op types of the graph ONNX Runtime runs for ``path`` after its optimisations (fusions included)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = f"{tmp}/optimized.onnx"
        _keep_int8(options)
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph  # ops only
        return collections.Counter(n.op_type for n in graph.node)


def _keep_int8(options) -> None:
    options.add_session_config_entry("session.qdqisint8allowed", "1")  # see the module docstring


__all__ = ["session", "optimized_ops"]
