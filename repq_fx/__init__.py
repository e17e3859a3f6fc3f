"""repq_fx: RepQ quantization-aware training for re-parametrized networks, as a Torch FX pass.

>>> import torch.nn as nn, repq_fx
>>> report = repq_fx.explain(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
>>> len(report.merged)
1
"""
from .api import calibrate, disable_fake_quant, enable_fake_quant, explain, export_onnx, lower, merge, prepare
from .compiling import compile
from .compiling_int8 import compile_int8
from .config import QConfig
from .capture import register_leaf_module
from .errors import (AlreadyPreparedError, CaptureError, CheckpointError, CompileError, ConfigError, DataError,
                     ExportError, ExportCheckError, InvalidModelError, ModelSpecError, NonFiniteError, NotCalibratedError,
                     NotPreparedError, RepQError, SaturationError, UnsupportedOpError)
from .patterns.linear_ops import register_op
from .targets import TARGETS, register_target
from .report import BlockReport, Report

__all__ = [
    "explain", "merge", "prepare", "calibrate", "lower", "export_onnx", "enable_fake_quant", "disable_fake_quant", "compile", "compile_int8", "QConfig", "register_leaf_module", "register_op", "TARGETS", "register_target", "Report", "BlockReport",
    "RepQError", "CaptureError", "CompileError", "ExportError", "SaturationError", "ExportCheckError", "NotCalibratedError", "AlreadyPreparedError", "InvalidModelError",
    "NonFiniteError", "CheckpointError", "DataError", "ConfigError", "UnsupportedOpError", "ModelSpecError", "NotPreparedError",
]
__version__ = "0.1.0"
