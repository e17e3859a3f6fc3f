"""What the float64 exactness tests share: the tolerance and the error they measure."""
from __future__ import annotations

import torch

REL_TOL = 1e-9  # merge and prepare (fake quant off) against the original model, float64


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``expected``.

    >>> rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
    0.5
    """
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
