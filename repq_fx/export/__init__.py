"""Deployment formats for lowered models: QDQ ONNX (``onnx_qdq``)."""
from .onnx_qdq import export_qdq, function_rule, method_rule, module_rule

__all__ = ["export_qdq", "module_rule", "function_rule", "method_rule"]
