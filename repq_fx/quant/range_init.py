"""Where a learned step starts: the step that minimises the squared quantization error (MSE).

A min-max step (``max|w| / Qp``) wastes most of a low-bit grid on a few outliers. Merged
RepVGG kernels are the extreme case: the identity and 1x1 branches pile onto the centre tap,
so the per-channel max is 11-23 standard deviations (``fmnist-baseline.md``) and at 3-4 bits
almost every other weight rounds to zero. Training from there starts at chance (the first
loss on the small RepVGG at W3A8 is 16) and never recovers. The MSE step clips the outliers
instead; it is the range setting the quantization white paper (Nagel et al. 2021, sec. 3.4)
recommends for weights and activations, searched here over a fixed grid of clipping ratios
``r = 1, 0.99, ..., 0.01`` of the observed range (ties keep the wider range, so a grid that
is fine enough for the data, e.g. 8 bits, usually keeps min-max).

Plain tensor functions: no modules, no state.

>>> w = torch.tensor([[3.0] + [0.9, -0.8, 0.7, -1.0, 0.6] * 2])
>>> w.abs().amax(dim=1) / 1                   # min-max, 2 bits (grid {-2, -1, 0, 1} x step)
tensor([3.])
>>> mse_symmetric_scale(w, -2, 1)             # clips the outlier, keeps the ten small weights
tensor([0.9900])
"""
from __future__ import annotations

import torch

RATIOS = 100  # clipping ratios searched: k / RATIOS for k = RATIOS .. 1


def _ratios(device: torch.device) -> torch.Tensor:
    return torch.arange(RATIOS, 0, -1, device=device, dtype=torch.float32) / RATIOS


def mse_symmetric_scale(w: torch.Tensor, quant_min: int, quant_max: int, per_channel: bool = True) -> torch.Tensor:
    """Per-output-channel (dim 0) step ``s = r * max|w_c| / quant_max`` of a symmetric grid
    ``[quant_min, quant_max]`` with the smallest ``sum (Q(w_c) - w_c)^2``; one step if not
    ``per_channel``. Returns float32 ``[C]`` (or ``[1]``).

    >>> mse_symmetric_scale(torch.tensor([[1.0, -0.5], [0.2, 0.2]]), -128, 127)   # 8 bits: the full range
    tensor([0.0079, 0.0016])
    """
    rows = w.detach().float().reshape(w.shape[0] if per_channel else 1, -1)
    amax = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    best_scale = amax / quant_max
    best_err = torch.full_like(amax, float("inf"))
    for r in _ratios(rows.device):
        scale = (amax * r / quant_max).clamp_min(torch.finfo(torch.float32).tiny)
        inv = scale.reciprocal().unsqueeze(1)
        q = (rows * inv).round_().clamp_(quant_min, quant_max).mul_(scale.unsqueeze(1))
        err = q.sub_(rows).square_().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def mse_affine_range(samples: torch.Tensor, lo: float, hi: float, quant_min: int,
                     quant_max: int) -> tuple[float, int]:
    """Step and zero point of an asymmetric grid over ``[r * lo, r * hi]`` (``lo <= 0 <= hi``) with
    the smallest ``sum (Q(x) - x)^2`` over ``samples``. Returns ``(step, zero_point)``.

    >>> x = torch.cat([torch.linspace(0, 1, 10000), torch.full((5,), 8.0)])   # five outliers
    >>> step, zp = mse_affine_range(x, 0.0, 8.0, 0, 15)                        # min-max: 8 / 15 = 0.53
    >>> round(step, 3), zp
    (0.304, 0)
    """
    values = samples.detach().float().reshape(-1)
    best = (float("inf"), max((hi - lo) / (quant_max - quant_min), 1e-8), 0)
    for r in _ratios(values.device).tolist():
        step = max((hi - lo) * r / (quant_max - quant_min), 1e-8)
        zero_point = int(min(max(quant_min - round(lo * r / step), quant_min), quant_max))
        q = (values * (1.0 / step)).round_().add_(zero_point).clamp_(quant_min, quant_max)
        err = float(q.sub_(zero_point).mul_(step).sub_(values).square_().sum())
        if err < best[0]:
            best = (err, step, zero_point)
    return best[1], best[2]
