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

    The weight is searched one tile (about ``TILE`` values, whole rows where a row fits) at a
    time, every ratio per tile, so that a large merged kernel is read from cache 100 times
    rather than from memory (and no weight-sized temporary is allocated per ratio).

    >>> mse_symmetric_scale(torch.tensor([[1.0, -0.5], [0.2, 0.2]]), -128, 127)   # 8 bits: the full range
    tensor([0.0079, 0.0016])
    """
    rows = w.detach().float().reshape(w.shape[0] if per_channel else 1, -1)
    amax = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    ratios = _ratios(rows.device)
    scales = (amax.unsqueeze(0) * ratios.unsqueeze(1) / quant_max).clamp_min(torch.finfo(torch.float32).tiny)
    errors = _squared_errors(rows, scales, quant_min, quant_max)  # [ratios, channels]
    best_scale = amax / quant_max
    best_err = torch.full_like(amax, float("inf"))
    for err, scale in zip(errors, scales):  # from the widest range down: ties keep the wider range
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


TILE = 1 << 19  # values per tile of the symmetric search (2 MiB of float32: fits a core's L2 or the L3)


def _squared_errors(rows: torch.Tensor, scales: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    """``sum_j (Q_s(rows[c, j]) - rows[c, j])^2`` for every step ``scales[k, c]``: ``[K, C]``.

    Rows that fit in a tile are summed whole (the same float sums as one pass over the tensor);
    a longer row is summed in parts of ``TILE`` values.
    """
    channels, length = rows.shape
    inverses = scales.reciprocal()
    errors = torch.zeros_like(scales)
    width = min(length, TILE)
    per_tile = max(1, TILE // width)
    buffer = torch.empty(min(per_tile, channels), width, dtype=rows.dtype, device=rows.device)
    for c0 in range(0, channels, per_tile):
        c1 = min(c0 + per_tile, channels)
        for j0 in range(0, length, width):
            part = rows[c0:c1, j0:j0 + width]
            out = buffer[:part.shape[0], :part.shape[1]]
            for k in range(scales.shape[0]):
                torch.mul(part, inverses[k, c0:c1].unsqueeze(1), out=out)
                out.round_().clamp_(quant_min, quant_max).mul_(scales[k, c0:c1].unsqueeze(1))
                errors[k, c0:c1] += out.sub_(part).square_().sum(dim=1)
    return errors


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
