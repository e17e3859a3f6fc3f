"""Where a learned step starts: the step that minimises the squared quantization error (MSE).

A min-max step (``max|w| / Qp``) wastes most of a low-bit grid on a few outliers. Merged
RepVGG kernels are the extreme case: the identity and 1x1 branches pile onto the centre tap,
so the per-channel max is 11-23 standard deviations (``docs/fashion-mnist-baseline.md``) and at 3-4 bits
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

    The same step as trying every ratio on the whole tensor, found faster (a large merged kernel
    took ~1 s): the weight is searched one tile (about ``TILE`` values, whole rows where a row fits)
    at a time, so it is read from cache rather than memory and no weight-sized temporary is made
    per ratio; and a tile stops at the first ratio whose clipping error alone (a lower bound of its
    squared error, :func:`_clipping_bounds`) exceeds the best error found, since every smaller
    ratio clips more.

    >>> mse_symmetric_scale(torch.tensor([[1.0, -0.5], [0.2, 0.2]]), -128, 127)   # 8 bits: the full range
    tensor([0.0079, 0.0016])
    """
    rows = w.detach().float().reshape(w.shape[0] if per_channel else 1, -1)
    amax = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    scales = (amax.unsqueeze(0) * _ratios(rows.device).unsqueeze(1) / quant_max).clamp_min(
        torch.finfo(torch.float32).tiny)  # [ratios, channels], from the widest range down
    inverses = scales.reciprocal()
    errors = torch.full_like(scales, float("inf"))  # ratios never tried keep +inf: they cannot win
    channels, length = rows.shape
    width = min(length, TILE)
    per_tile = max(1, TILE // width)
    buffer = torch.empty(min(per_tile, channels), width, dtype=rows.dtype, device=rows.device)
    for c0 in range(0, channels, per_tile):
        c1 = min(c0 + per_tile, channels)
        tile = rows[c0:c1]
        tile_scales, tile_inverses = scales[:, c0:c1].unsqueeze(2), inverses[:, c0:c1].unsqueeze(2)
        tile_errors = errors[:, c0:c1]
        largest = _largest_per_run(tile)
        best = tile_errors[0]
        for k in range(scales.shape[0]):
            if k % _BOUNDS_AT_ONCE == 0:  # bounds for the next few ratios (most tiles stop after a few)
                bounds = _clipping_bounds(largest, scales[k:k + _BOUNDS_AT_ONCE, c0:c1],
                                          max(-quant_min, quant_max), length)
            if k and bool((bounds[k % _BOUNDS_AT_ONCE] > best).all()):
                break  # this ratio and every smaller one clip more than the best error of each channel
            err = tile_errors[k]
            err.zero_()
            for j0 in range(0, length, width):  # a row longer than a tile is summed in parts
                part = tile[:, j0:j0 + width]
                out = buffer[:part.shape[0], :part.shape[1]]
                torch.mul(part, tile_inverses[k], out=out)
                out.round_().clamp_(quant_min, quant_max).mul_(tile_scales[k])
                err += out.sub_(part).square_().sum(dim=1)
            best = torch.minimum(best, err)
    # the first ratio (widest range) with the smallest error: ties keep the wider range
    best_k = torch.nan_to_num(errors, nan=float("inf")).argmin(dim=0, keepdim=True)
    return scales.gather(0, best_k).reshape(-1)


TILE = 1 << 19  # values per tile of the symmetric search (2 MiB of float32: fits a core's L2 or the L3)
_BLOCK = 64  # the clipping bounds read the largest |w| of every run of this many values of a row
_BOUNDS_AT_ONCE = 16


def _largest_per_run(rows: torch.Tensor) -> torch.Tensor:
    """The largest ``|w|`` of every run of ``_BLOCK`` values of each row (and the last values as they
    are): ``[C, m]`` float64, distinct values of the row."""
    channels, length = rows.shape
    magnitudes = rows.abs()
    runs = length // _BLOCK
    largest = magnitudes[:, :runs * _BLOCK].reshape(channels, runs, _BLOCK).amax(dim=2)
    return torch.cat([largest, magnitudes[:, runs * _BLOCK:]], dim=1).double()


def _clipping_bounds(largest: torch.Tensor, scales: torch.Tensor, clip: int, length: int) -> torch.Tensor:
    """For every step ``scales[k, c]``: a lower bound of the float32 squared error that the search
    computes for row ``c`` (``[K, C]``, float64), from some of its values (``largest``, see
    :func:`_largest_per_run`; ``length``: the row's length).

    A value with ``|w| > clip * s`` lands outside the grid and costs at least ``(|w| - clip * s)^2``
    (``clip``: the larger end of the grid); the bound sums this over distinct values of the row, so
    it is a partial sum of the error's terms (a tail of a few large values is mostly among the
    largest of each run). The threshold is raised by 8 float32 roundings (``w / s`` and ``Q * s`` are
    rounded) and the sum lowered by the worst-case float32 summation error of a row, so the bound
    holds for the computed errors, not only the exact ones.
    """
    unit = 2.0 ** -24
    threshold = scales.double().mul(clip * (1 + 8 * unit)).unsqueeze(2)  # [K, C, 1]
    over = (largest.unsqueeze(0) - threshold).clamp_(min=0)
    return over.square_().sum(dim=2).mul_(max(0.0, 1 - 2 * (length + 8) * unit))


def mse_affine_range(samples: torch.Tensor, lo: float, hi: float, quant_min: int,
                     quant_max: int) -> tuple[float, int]:
    """Step and zero point of an asymmetric grid over ``[r * lo, r * hi]`` (``lo <= 0 <= hi``) with
    the smallest ``sum (Q(x) - x)^2`` over ``samples``. Returns ``(step, zero_point)``.

    Ratios whose clipping error alone (a lower bound of their squared error, as in
    :func:`mse_symmetric_scale`) exceeds the best error found are not tried: they cannot win.

    >>> x = torch.cat([torch.linspace(0, 1, 10000), torch.full((5,), 8.0)])   # five outliers
    >>> step, zp = mse_affine_range(x, 0.0, 8.0, 0, 15)                        # min-max: 8 / 15 = 0.53
    >>> round(step, 3), zp
    (0.304, 0)
    """
    values = samples.detach().float().reshape(-1)
    grids = []
    for r in _ratios(values.device).tolist():
        step = max((hi - lo) * r / (quant_max - quant_min), 1e-8)
        grids.append((step, int(min(max(quant_min - round(lo * r / step), quant_min), quant_max))))
    bounds = _affine_clipping_bounds(values, grids, quant_min, quant_max)
    best = (float("inf"), max((hi - lo) / (quant_max - quant_min), 1e-8), 0)
    for (step, zero_point), bound in zip(grids, bounds):
        if bound > best[0]:
            continue  # its clipped values alone cost more than the best grid so far
        q = (values * (1.0 / step)).round_().add_(zero_point).clamp_(quant_min, quant_max)
        err = float(q.sub_(zero_point).mul_(step).sub_(values).square_().sum())
        if err < best[0]:
            best = (err, step, zero_point)
    return best[1], best[2]


def _affine_clipping_bounds(values: torch.Tensor, grids: list[tuple[float, int]], quant_min: int,
                            quant_max: int) -> list[float]:
    """Per ``(step, zero_point)``: a lower bound of the float32 squared error the search computes,
    from the largest and smallest value of every run of ``_BLOCK`` values (see :func:`_clipping_bounds`:
    values beyond an end of the grid cost at least their distance to it, squared)."""
    if not values.numel():
        return [0.0] * len(grids)
    unit = 2.0 ** -24
    runs = values.numel() // _BLOCK
    blocks = values[:runs * _BLOCK].reshape(runs, _BLOCK)
    rest = values[runs * _BLOCK:]
    highest = torch.cat([blocks.amax(dim=1), rest]).double()
    lowest = torch.cat([blocks.amin(dim=1), rest]).double()
    step = torch.tensor([g[0] for g in grids], dtype=torch.float64, device=values.device)
    zero_point = torch.tensor([float(g[1]) for g in grids], dtype=torch.float64, device=values.device)
    top = ((quant_max - zero_point) * step).abs().mul_(1 + 8 * unit).unsqueeze(1)  # grid ends, widened
    bottom = ((quant_min - zero_point) * step).abs().mul_(1 + 8 * unit).unsqueeze(1)
    above = (highest.unsqueeze(0) - top).clamp_(min=0).square_().sum(dim=1)
    below = (-lowest.unsqueeze(0) - bottom).clamp_(min=0).square_().sum(dim=1)
    return (above + below).mul_(max(0.0, 1 - 2 * (values.numel() + 8) * unit)).tolist()
