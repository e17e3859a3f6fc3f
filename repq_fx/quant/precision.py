"""Float32 islands under ``torch.autocast``: the integer grid does not move with the compute dtype.

Under mixed precision (``torch.autocast`` with bfloat16 or float16) the ops autocast lists
(convolutions, matrix products) run in the low dtype. That is what the *data* path of a RepQ
model should do, but not what computes its integer grid: the merged weight ``M(theta)`` (BN folds,
kernel compositions such as DBB's 1x1 -> kxk conv of kernels), the BN batch statistics it
folds in, and the fake quantizers. There a bfloat16 rounding (8 significant bits) of a kernel or a
step moves weights across rounding boundaries, so the integers ``round(w / s)`` would depend on
the compute dtype. This module runs those computations in float32 with autocast off:

- :func:`float32_call` runs a function with autocast disabled on the device of its tensors and
  low-precision floating tensors (float16, bfloat16) among its arguments cast to float32; without
  autocast it calls the function as it is (float64 models stay float64);
- :data:`FLOAT32_OPS` maps the autocast-affected ops that appear in a merged-weight graph to
  float32 twins (``prepare`` rewrites the weight synthesis to use them, see
  :func:`repq_fx.passes.float32_weights.keep_weights_float32`);
- :func:`float32_function` is a decorator for functions such as the BN statistics.

The conv that *uses* the fake-quantized weight and activation still runs in the autocast dtype:
its float32 inputs lie on the grid, and autocast rounds them to bfloat16/float16 for the
product, like any weight under AMP.

>>> with torch.autocast("cpu", dtype=torch.bfloat16):
...     low = torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype
...     kept = mm(torch.ones(2, 2), torch.ones(2, 2)).dtype
>>> low, kept
(torch.bfloat16, torch.float32)
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["FLOAT32_OPS", "autocast_active", "float32_call", "float32_function", "to_float32"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
Fn = TypeVar("Fn", bound=Callable[..., Any])


def to_float32(value: Any) -> Any:
    """A float16/bfloat16 tensor as float32; anything else unchanged.

    >>> to_float32(torch.ones(1, dtype=torch.bfloat16)).dtype, to_float32(torch.ones(1, dtype=torch.float64)).dtype
    (torch.float32, torch.float64)
    """
    if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION:
        return value.float()
    return value


def _device_type(args: tuple, kwargs: dict) -> str | None:
    if args and isinstance(args[0], torch.Tensor):  # the usual case, without flattening
        return args[0].device.type
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf.device.type
    return None


def autocast_active(device_type: str) -> bool:
    """True inside ``torch.autocast(device_type)`` (enabled).

    >>> autocast_active("cpu")
    False
    """
    return torch.is_autocast_enabled(device_type)


def float32_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; under autocast on the device of the first tensor argument, with
    autocast disabled there and float16/bfloat16 tensor arguments cast to float32.

    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     float32_call(torch.mm, torch.ones(1, 1, dtype=torch.bfloat16), torch.ones(1, 1)).dtype
    torch.float32
    """
    device = _device_type(args, kwargs)
    if device is None or not autocast_active(device):
        return fn(*args, **kwargs)
    with torch.autocast(device, enabled=False):
        return fn(*tree_map(to_float32, args), **tree_map(to_float32, kwargs))


def float32_function(fn: Fn) -> Fn:
    """Decorator: ``fn`` always runs through :func:`float32_call`.

    >>> double = float32_function(lambda x: torch.mm(x, x))
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     double(torch.eye(2)).dtype
    torch.float32
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return float32_call(fn, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _float32_twin(op: Callable[..., Any], name: str, written: str) -> Callable[..., torch.Tensor]:
    """``op`` in float32 under autocast, as a function named ``name`` of this module (so that a prepared
    GraphModule's generated code names it and pickles)."""
    def twin(*args: Any, **kwargs: Any) -> torch.Tensor:
        return float32_call(op, *args, **kwargs)

    twin.__name__ = twin.__qualname__ = name
    twin.__doc__ = f"``{written}`` in float32 under autocast."
    return twin


# Float32 twins of the autocast-affected ops of a merged-weight graph (kernel compositions of the merged weight)
conv2d = _float32_twin(F.conv2d, "conv2d", "F.conv2d")
conv_transpose2d = _float32_twin(F.conv_transpose2d, "conv_transpose2d", "F.conv_transpose2d")
linear = _float32_twin(F.linear, "linear", "F.linear")
mm = _float32_twin(torch.mm, "mm", "torch.mm")
bmm = _float32_twin(torch.bmm, "bmm", "torch.bmm")
matmul = _float32_twin(torch.matmul, "matmul", "torch.matmul (@)")
einsum = _float32_twin(torch.einsum, "einsum", "torch.einsum")

FLOAT32_OPS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.conv2d: conv2d, torch.conv2d: conv2d, F.conv_transpose2d: conv_transpose2d,
    torch.conv_transpose2d: conv_transpose2d, F.linear: linear, torch.mm: mm, torch.bmm: bmm,
    torch.matmul: matmul, operator.matmul: matmul, torch.einsum: einsum,
}
