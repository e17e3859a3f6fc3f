"""``torch.compile`` for prepared models, with the inductor setting that suits them.

A prepared model computes its conv kernels in the graph (each block's merged weight, fake
quantized). On the CPU, inductor's layout optimization puts every conv of a graph in channels-last
(it always does when mkldnn is available), and so it also lays those computed kernels out
channels-last. The conv's backward and the gradient accumulation into the branch kernels then copy
every kernel-sized tensor back to the default layout, at every training step (the measurements:
benchmarks/RESULTS.md, "repq_fx.compile"). A float model does not pay this: its kernels are
parameters, which keep their layout. :func:`compile` is ``torch.compile`` with that optimization off
for models on the CPU, and otherwise exactly ``torch.compile``.

>>> import torch.nn as nn
>>> compiled = compile(nn.Linear(2, 2))           # compiles lazily, on the first call
>>> type(compiled).__name__
'OptimizedModule'
>>> cpu_inductor_options(nn.Linear(2, 2))
{'layout_optimization': False}
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["compile", "cpu_inductor_options"]


def cpu_inductor_options(model: nn.Module) -> dict[str, Any]:
    """The inductor options :func:`compile` adds for ``model``: layout optimization off when all
    its parameters and buffers are on the CPU (or it has none), nothing otherwise (GPU convs were not
    measured, and channels-last is what their fast kernels want).

    >>> cpu_inductor_options(nn.Conv2d(1, 1, 1))
    {'layout_optimization': False}
    """
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" for t in tensors):
        return {"layout_optimization": False}
    return {}


def compile(model: nn.Module, *, backend: str | Callable = "inductor", options: dict[str, Any] | None = None,
            **kwargs: Any) -> nn.Module:
    """``torch.compile(model, backend=backend, options=..., **kwargs)`` where ``options`` starts from
    :func:`cpu_inductor_options` (inductor only; the given ``options`` win over it).

    Call it on the model on the device it will train on (the options are chosen from where its
    parameters are now). Everything ``torch.compile`` takes is passed on (``dynamic``,
    ``fullgraph``, ...). A ``mode`` is passed as the inductor options it stands for
    (``torch._inductor.list_mode_options``, what ``torch.compile`` itself applies), because
    ``torch.compile`` does not take a ``mode`` and ``options`` together.

    >>> import repq_fx, torch.nn as nn
    >>> qmodel = repq_fx.prepare(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    >>> compiled = repq_fx.compile(qmodel)          # train with it as with torch.compile(qmodel)
    """
    if backend == "inductor":
        mode = kwargs.pop("mode", None)
        if mode is not None and options is not None:
            raise ConfigError("give compile() either mode or options, not both (as torch.compile); a mode "
                              "is a set of inductor options (torch._inductor.list_mode_options)")
        from_mode: dict[str, Any] = {}
        if mode not in (None, "default"):
            from torch._inductor import list_mode_options
            from_mode = list_mode_options(mode, kwargs.get("dynamic"))
        options = {**cpu_inductor_options(model), **from_mode, **(options or {})}
    if options:
        kwargs["options"] = options
    return torch.compile(model, backend=backend, **kwargs)
