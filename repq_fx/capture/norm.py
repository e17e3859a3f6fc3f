"""Moved to :mod:`repq_fx.ir.norm`; this name stays so graphs saved with ``torch.save`` before the move
(their code names ``repq_fx.capture.norm.batch_norm``) still load.

>>> from repq_fx.ir import norm
>>> batch_norm is norm.batch_norm
True
"""
from ..ir.norm import batch_norm, is_batch_norm

__all__ = ["batch_norm", "is_batch_norm"]
