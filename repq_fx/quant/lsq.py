"""LSQ fake quantization on the CPU: :func:`lsq_fake_quantize`, PyTorch's learnable fused fake-quant
ops computed with vectorized tensor ops.

The same function as ``torch._fake_quantize_learnable_per_{channel,tensor}_affine``, value for
value: the forward is bit-identical (the same float ``x * (1/s)``, round-half-even, clamp, ``* s``;
tests/test_qat_fast_paths.py checks it against the fused ops, ties included) and so are the
gradients (gradient scale ``grad_factor``). PyTorch's CPU kernels for these ops are scalar loops
(``std::nearbyint`` per element, three full-size temporaries in backward); a prepared model fake
quantizes its merged weights, as large as the activations at small inputs, at every step.

>>> x = torch.tensor([0.26, -0.74, 3.0])
>>> lsq_fake_quantize(x, torch.tensor([0.5]), None, -4, 3, 1.0)
tensor([ 0.5000, -0.5000,  1.5000])
"""
from __future__ import annotations

import torch


class _LearnedFakeQuant(torch.autograd.Function):
    """LSQ fake quant with the gradients of ``torch._fake_quantize_learnable_per_*_affine``.

    ``scale`` (and ``zero_point``) are ``[C]`` for per-channel along dim 0, ``[1]`` for per tensor.
    Step gradient per element: ``(Q(x) - x) / s`` where ``round(x / s) + z`` lands in the range,
    ``quant_min - z`` or ``quant_max - z`` where it is clipped (the input gradient is 0 there);
    summed per channel and times ``grad_factor``. (At an exact tie ``x / s = k + 1/2`` with a
    non-zero zero point PyTorch's backward kernel rounds ``z + x / s`` while its forward rounds
    ``x / s``; here both use the forward's rounding.) Backward recomputes the rounding and ``Q(x)``
    from ``x``, the one tensor saved (as PyTorch's fused ops do): the output belongs to the model,
    which may change it in place (``ReLU6(inplace=True)`` after a quantized conv, as a conv's or a
    BatchNorm's output may be changed). Two input-sized temporaries, ten passes (the two extra ones
    rebuild ``Q(x)`` instead of keeping it in a third temporary); no boolean tensors (``where`` and
    masks are slower than float arithmetic on the CPU).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, grad_factor):  # type: ignore[override]
        s, zp, inv = _grid(x, scale, zero_point, quant_min, quant_max)
        ctx.grid = (s, zp, inv)
        y = x * inv  # x * (1.0f / scale), as the fused kernels compute it
        y.round_()  # nearbyint: half to even
        if zp is not None:
            y.add_(zp)
        y.clamp_(quant_min, quant_max)
        if zp is not None:
            y.sub_(zp)
        y.mul_(s)
        ctx.save_for_backward(x)  # not y: the model may modify its output in place
        ctx.scale_shape = scale.shape
        ctx.quant_range, ctx.grad_factor = (quant_min, quant_max), grad_factor
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        quant_min, quant_max = ctx.quant_range
        s, zp, inv = ctx.grid
        q = x * inv
        q.round_()
        if zp is not None:
            q.add_(zp)
        clipped = q.clamp(quant_min, quant_max)
        inside = torch.eq(q, clipped, out=q)  # 1.0 where round(x/s) + z is in range, else 0.0
        dscale = None
        if ctx.needs_input_grad[1]:
            # Q(x) as the forward computed it, bit for bit, in the clamped buffer
            if zp is not None:
                clipped.sub_(zp)
            y = clipped.mul_(s)
            # s * (step gradient): Q(x) - x inside the range, Q(x) = (quant_min/max - z) s where clipped
            scaled = torch.addcmul(y, x, inside, value=-1, out=clipped)
            if ctx.scale_shape.numel() > 1:
                dscale = scaled.mul_(dy).sum(dim=tuple(range(1, x.dim())))
            else:
                dscale = torch.dot(scaled.reshape(-1), dy.reshape(-1)).reshape(1)
            dscale = dscale.mul_(inv.reshape(-1)).mul_(ctx.grad_factor).reshape(ctx.scale_shape)
        dx = inside.mul_(dy) if ctx.needs_input_grad[0] else None
        return dx, dscale, None, None, None, None


def _grid(x, scale, zero_point, quant_min, quant_max):
    """Step, rounded zero point (``None`` when all zero, or ``zero_point`` is ``None``) and ``1 / step``,
    shaped to broadcast over ``x``.

    Under ``torch.compile`` a given zero point is always applied (adding a zero changes no value, the
    compiled kernel fuses it, and testing for zeros would be a data-dependent graph break).
    """
    shape = (-1,) + (1,) * (x.dim() - 1) if scale.numel() > 1 else (1,) * x.dim()
    s = scale.detach().reshape(shape)
    zp = None
    if zero_point is not None and (torch.compiler.is_compiling() or bool(zero_point.any())):
        zp = zero_point.round().clamp(quant_min, quant_max).reshape(shape)
    return s, zp, torch.reciprocal(s)


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, quant_min: int,
                      quant_max: int, grad_factor: float) -> torch.Tensor:
    """``torch._fake_quantize_learnable_per_channel_affine`` (axis 0; ``scale`` ``[C]``) or
    ``..._per_tensor_affine`` (``scale`` ``[1]``), float32, computed with vectorized ops on the CPU;
    ``zero_point`` ``None`` means zeros (symmetric weights).

    >>> x = torch.tensor([[0.3, -1.25, 9.0], [0.05, 0.1, -0.2]])
    >>> s, z = torch.tensor([0.5, 0.1]), torch.zeros(2)
    >>> torch.equal(lsq_fake_quantize(x, s, z, -8, 7, 1.0),
    ...             torch._fake_quantize_learnable_per_channel_affine(x, s, z, 0, -8, 7, 1.0))
    True
    """
    if x.device.type != "cpu" or x.dtype != torch.float32:
        if zero_point is None:
            zero_point = torch.zeros_like(scale)
        if scale.numel() > 1:
            return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, 0, quant_min, quant_max,
                                                                     grad_factor)
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, quant_min, quant_max,
                                                                grad_factor)
    return _LearnedFakeQuant.apply(x, scale, zero_point, quant_min, quant_max, grad_factor)


__all__ = ["lsq_fake_quantize"]
