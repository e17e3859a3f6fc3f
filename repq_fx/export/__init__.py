"""Deployment formats for lowered models: QDQ ONNX (``onnx_qdq``), checked by ``parity`` and ``saturation``."""
from .onnx_qdq import TRANSLATIONS, export_qdq

__all__ = ["export_qdq", "TRANSLATIONS"]
