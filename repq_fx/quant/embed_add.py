"""The branch sum of a prepared model's merged weight, as it runs in training: ``algebra.kernels.embed_add``
with its own backward.

``prepare`` records the algebra's ``embed_add`` as a call to :func:`embed_add` here (same
arguments, and ``inplace``, which ``prepare`` sets where the frame is a temporary that nothing
else reads). Its autograd function gives the frame the output's gradient without a copy
(autograd's in-place bookkeeping would copy it) and each kernel the output gradient where it
landed; under ``torch.compile`` it adds out of place, since Dynamo cannot trace ``mark_dirty``.

>>> frame = torch.zeros(2, 2, 3, 3, requires_grad=True)
>>> kernel = torch.ones(2, 2, 1, 1, requires_grad=True)
>>> out = embed_add(frame, (kernel,), ((1, 1),), (1,), 1)
>>> out.sum().backward()
>>> kernel.grad.flatten().tolist()
[1.0, 1.0, 1.0, 1.0]
"""
from __future__ import annotations

from typing import Any

import torch

from ..algebra.kernels import embed_into, group_columns


def embed_add(frame: Any, kernels: tuple, offsets: tuple, groups: tuple, frame_groups: int,
              inplace: bool = False) -> Any:
    """``algebra.kernels.embed_add(frame, kernels, offsets, groups, frame_groups)``; ``inplace`` adds into
    ``frame`` itself (for a temporary that nothing else reads and whose producer did not save it for
    backward: ``prepare`` decides)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (frame, *kernels)):
        out = frame if inplace else frame.clone()  # nothing to differentiate: plain tensor ops
        embed_into(out, kernels, offsets, groups, frame_groups)
        return out
    inplace = inplace and not torch.compiler.is_compiling()  # Dynamo cannot trace mark_dirty (a graph break)
    return _EmbedAdd.apply(frame, tuple(offsets), tuple(groups), frame_groups, inplace, *kernels)


class _EmbedAdd(torch.autograd.Function):
    """``embed_add`` with the obvious backward: the frame's gradient is the output's (no copy; autograd's
    in-place bookkeeping would copy it), each kernel's is the output gradient where it landed."""

    @staticmethod
    def forward(ctx, frame, offsets, groups, frame_groups, inplace, *kernels):  # type: ignore[override]
        out = frame if inplace else frame.clone()
        embed_into(out, kernels, offsets, groups, frame_groups)
        if inplace:
            ctx.mark_dirty(frame)
        ctx.layout = (offsets, groups, frame_groups, [k.shape for k in kernels])
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        offsets, groups, frame_groups, shapes = ctx.layout
        grads = []
        for i, (shape, (top, left), g) in enumerate(zip(shapes, offsets, groups)):
            if not ctx.needs_input_grad[5 + i]:
                grads.append(None)
                continue
            region = dout[:, :, top:top + shape[2], left:left + shape[3]]
            if g == frame_groups:
                grads.append(region.clone())
            else:
                rows, columns, ratio = group_columns(shape[0], g, frame_groups, dout.device)
                grads.append(region.unflatten(1, (ratio, shape[1]))[rows, columns])
        return (dout if ctx.needs_input_grad[0] else None, None, None, None, None, *grads)


__all__ = ["embed_add"]
