"""Where the parameters of a region come from when it is merged numerically: the model's values
(:class:`NumericValues`, float64, BatchNorm with running statistics) or random values of every
trainable tensor (:class:`GenericValues`, to test that a decision holds for every value training reaches).

>>> import torch.nn as nn
>>> from repq_fx.capture import capture
>>> gm = capture(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)))
>>> NumericValues(gm).param(next(n for n in gm.graph.nodes if n.op == "get_attr")).dtype
torch.float64
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..algebra import AffineConv, NoMatch, ops
from ..ir import fetch_attr, is_batch_norm


class NumericValues:
    """Parameter values as float64 tensors, BatchNorm with running statistics (the eval-mode merge)."""

    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype = torch.float64) -> None:
        self.gm, self.dtype = gm, dtype
        self._cache: dict[fx.Node, Any] = {}  # values in self.dtype
        self._raw_cache: dict[fx.Node, Any] = {}  # values as the model computes them

    def param(self, arg: Any) -> Any:
        return fx.node.map_arg(arg, self._node_value) if isinstance(arg, (fx.Node, list, tuple, dict)) else arg

    def _node_value(self, node: fx.Node) -> Any:
        if node not in self._cache:
            value = self._raw(node)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.detach().to(self.dtype)
            self._cache[node] = value
        return self._cache[node]

    def leaf(self, value: Any) -> Any:
        """The value used for a parameter, buffer or module read from the model (itself here)."""
        return value

    def _raw(self, node: fx.Node) -> Any:
        """A parameter expression evaluated in the model's own dtype (as the model computes it)."""
        if node.op == "get_attr":
            return self.leaf(fetch_attr(self.gm, node.target))
        if node not in self._raw_cache:
            args = fx.node.map_arg(node.args, self._raw)
            kwargs = fx.node.map_arg(node.kwargs, self._raw)
            with torch.no_grad():
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "call_module":
                    value = self.gm.get_submodule(node.target)(*args, **kwargs)
                else:
                    raise AssertionError(f"cannot evaluate {node.op} {node.target} as a parameter")
            self._raw_cache[node] = value
        return self._raw_cache[node]

    def bn(self, node: fx.Node, module: torch.nn.Module, before: AffineConv | None) -> AffineConv | NoMatch:
        return running_stats_bn(module, self.dtype, self.leaf)


class GenericValues(NumericValues):
    """The same parameter expressions on random values of every trainable tensor.

    Trainable: parameters that require grad, and BatchNorm running statistics (train mode moves
    them). Buffers that never change (fixed masks, identity kernels) and frozen parameters keep
    their values. A decision the algebra takes on these values and on the model's own
    (``algebra.decisions``) holds for the values training will reach, not only for today's
    (a bias that is exactly zero at initialisation). Values are drawn in ``[0.5, 1.5)``, so square
    roots and variances stay defined; the draw is fixed by ``seed``.

    >>> from repq_fx.capture import capture
    >>> gm = capture(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)))
    >>> bool((GenericValues(gm).leaf(gm.get_submodule("1").running_mean) > 0).all())  # zeros in the model
    True
    """

    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__(gm, dtype)
        self._trainable = {id(p) for p in gm.parameters() if p.requires_grad}
        for m in gm.modules():
            if is_batch_norm(m) and m.running_mean is not None:
                self._trainable |= {id(m.running_mean), id(m.running_var)}
        self._generator = torch.Generator().manual_seed(seed)
        self._drawn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor kept alive, its draw)

    def leaf(self, value: Any) -> Any:
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and id(value) in self._trainable):
            return value
        if id(value) not in self._drawn:
            draw = 0.5 + torch.rand(value.shape, generator=self._generator, dtype=torch.float64)
            self._drawn[id(value)] = (value, draw.to(value.dtype))
        return self._drawn[id(value)][1]


def running_stats_bn(module: torch.nn.Module, dtype: torch.dtype, leaf: Callable[[Any], Any] = lambda t: t
                     ) -> AffineConv | NoMatch:
    """The eval-mode map of a BatchNorm module (running statistics), or why there is none.

    ``leaf`` gives the value used for each of the module's tensors (the tensor itself by default).
    """
    if module.running_mean is None or not module.track_running_stats:
        return NoMatch("BatchNorm with track_running_stats=False normalizes with batch statistics even in eval mode")
    weight = leaf(module.weight).detach().to(dtype) if module.weight is not None else None
    bias = leaf(module.bias).detach().to(dtype) if module.bias is not None else None
    return ops.batch_norm(leaf(module.running_mean).to(dtype), leaf(module.running_var).to(dtype), weight, bias,
                          module.eps)
