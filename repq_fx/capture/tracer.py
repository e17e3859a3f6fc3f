"""Trace an unmodified model with torch.fx, keeping norm layers as leaves.

A graph traced *through* a BatchNorm bakes ``training=True/False`` into
``F.batch_norm``; keeping BatchNorm modules (and timm's norm-act wrappers, through
timm's own no-trace registry) as ``call_module`` leaves lets the captured graph
follow ``.train()`` / ``.eval()`` at run time.

Other modules timm marks no-trace (``register_notrace_module``, for its feature extraction:
mostly modules whose forward branches on sizes, e.g. ``MobileVitBlock``) are traced into when
they hold a conv and torch.fx can trace them (see :meth:`LeafTracer.is_leaf_module`), so their
convs are merged and quantized; otherwise they stay leaves. Every leaf that holds a conv is
recorded with the reason in ``gm.meta["repq_leaf_reasons"]``, which ``explain`` shows: its convs
are never merged or quantized.

>>> import torch.nn as nn
>>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
>>> [n.op for n in gm.graph.nodes]
['placeholder', 'call_module', 'call_module', 'output']
"""
from __future__ import annotations

import inspect

import copy
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..errors import CaptureError
from ..ir import hook_kinds

_LEAF_TYPES: list[type[nn.Module]] = [nn.modules.batchnorm._BatchNorm]
STOCHASTIC_DEPTH = ("DropPath", "StochasticDepth")  # class names of timm/torchvision stochastic depth: kept as modules so they follow train/eval


def register_leaf_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Keep modules of ``cls`` opaque (one ``call_module`` node) when tracing; usable as a decorator.

    >>> @register_leaf_module
    ... class MyOp(nn.Module):
    ...     def forward(self, x):
    ...         return x * 2
    """
    if cls not in _LEAF_TYPES:
        _LEAF_TYPES.append(cls)
    return cls


def _timm_leaf_types() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except Exception:  # timm missing or too old: nothing to honour
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


_OWN_GRAPH_FUNCTION_MODULES = ("repq_fx.quant.", "repq_fx.ir.", "repq_fx.capture.", "repq_fx.algebra.",
                               "repq_fx.passes.")


class LeafTracer(fx.Tracer):
    """``fx.Tracer`` whose leaves are torch.nn modules, norm layers, registered modules and the timm
    no-trace modules that torch.fx cannot trace. ``leaf_reasons``: qualified name -> why, for each
    leaf that holds a conv."""

    def __init__(self) -> None:
        timm_modules, timm_functions = _timm_leaf_types()
        super().__init__(autowrap_functions=timm_functions)
        self._leaf_types = tuple(_LEAF_TYPES)
        self._timm_types = timm_modules
        self.leaf_reasons: dict[str, str] = {}
        self._untraceable: dict[int, str] = {}  # id(module) -> why torch.fx cannot trace it ("" if it can)
        # Buffers read as attributes become get_attr nodes. Without this, FX evaluates an expression of
        # buffers alone at trace time and bakes its value into the graph as a constant: DBB's pad value
        # `sqrt(bn.running_var + eps)` froze, so the model no longer followed its running statistics.
        self.proxy_buffer_attributes = True

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        # Our own graph functions (BN statistics, mode-following batch_norm, kernel helpers) stay calls
        # when a GraphModule we produced is traced again, as torch.load of a pickled GraphModule does.
        fn = type(root).forward if isinstance(root, nn.Module) else root
        for value in getattr(fn, "__globals__", {}).values():
            if inspect.isfunction(value) and value.__module__.startswith(_OWN_GRAPH_FUNCTION_MODULES):
                self._autowrap_function_ids.add(id(value))
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ in STOCHASTIC_DEPTH:
            return True
        if isinstance(m, self._leaf_types):
            self._note(m, module_qualified_name, "registered as a leaf with repq_fx.register_leaf_module")
            return True
        if isinstance(m, self._timm_types):
            if not holds_conv(m):
                return True
            why = self._why_untraceable(m)
            if not why:
                return False  # timm's mark is for its own feature extraction: trace into it
            self._note(m, module_qualified_name, f"timm marks it no-trace and torch.fx cannot trace it ({why})")
            return True
        leaf = super().is_leaf_module(m, module_qualified_name)
        if leaf and holds_conv(m) and not isinstance(m, nn.modules.conv._ConvNd):
            self._note(m, module_qualified_name, "torch.fx keeps torch.nn modules whole")
        return leaf

    def _note(self, m: nn.Module, name: str, reason: str) -> None:
        if holds_conv(m):
            self.leaf_reasons[name] = reason

    def _why_untraceable(self, m: nn.Module) -> str:
        """Why torch.fx cannot trace ``m`` on its own ("" if it can): FX's error, or an in-place op whose
        result nothing reads (FX's dead-code elimination drops it: pytorch issue 68301)."""
        if id(m) not in self._untraceable:
            try:
                graph = LeafTracer().trace(m)
            except Exception as e:  # FX raises many types
                self._untraceable[id(m)] = f"{type(e).__name__}: {_first_line(e)}"
            else:
                dropped = [n for n in graph.nodes if not n.users and _in_place(n)]
                self._untraceable[id(m)] = (f"{dropped[0].target} in place with its result unused, which "
                                            "torch.fx would drop" if dropped else "")
        return self._untraceable[id(m)]


def holds_conv(m: nn.Module) -> bool:
    """``m`` is or contains a convolution module.

    >>> holds_conv(nn.Sequential(nn.ReLU(), nn.Conv2d(1, 1, 1))), holds_conv(nn.ReLU())
    (True, False)
    """
    return any(isinstance(sub, nn.modules.conv._ConvNd) for sub in m.modules())


def _in_place(node: fx.Node) -> bool:
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return (name.endswith("_") and not name.endswith("__")) or node.kwargs.get("inplace") is True


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def trace(model: nn.Module, concrete_args: dict[str, Any] | None = None, mode: str = "train") -> fx.GraphModule:
    """A GraphModule of a deep copy of ``model`` (the model itself is never touched), traced in ``mode``.

    ``mode`` (``"train"`` or ``"eval"``) decides the Python branches on ``self.training``; BatchNorm and
    dropout modules stay modules that follow ``.train()``/``.eval()`` at run time whatever it is.

    Raises :class:`CaptureError` with FX's reason and what to do when tracing fails.
    """
    _check_root_hooks(model)
    model = _copy(model)
    if isinstance(model, fx.GraphModule):
        return fx.GraphModule(model, model.graph, model.__class__.__name__)
    if mode not in ("train", "eval"):
        raise AssertionError(f"mode must be 'train' or 'eval', got {mode!r}")
    model = model.train(mode == "train")  # decides `if self.training:` branches
    tracer = LeafTracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:  # FX raises many types (TraceError, TypeError, RuntimeError...)
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
            "What to do: capture with torch.export instead (capture='export', with example_inputs=(x,) of a "
            "real input: it runs the Python as written, arguments not given at their defaults); or make the "
            "failing submodule a leaf with repq_fx.register_leaf_module(ItsClass) (it is then kept as it is and "
            "never merged); or, for Python arguments that steer control flow, trace it yourself with "
            "torch.fx.symbolic_trace(model, concrete_args={...}) and pass the GraphModule; or rewrite the "
            "data-dependent Python (int() on shapes, slice assignment, branches on tensor values) in a "
            "traceable form."
        ) from e
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    gm.meta["repq_leaf_reasons"] = {k: v for k, v in tracer.leaf_reasons.items() if k in called}
    return gm


def _check_root_hooks(model: nn.Module) -> None:
    """FX traces ``model.forward``, not ``model(...)``: hooks on the model itself would silently vanish."""
    kinds = hook_kinds(model)
    if kinds:
        raise CaptureError(
            f"{type(model).__name__} has a {' and a '.join(kinds)} hook on the model itself; torch.fx traces "
            "forward() without it, so the result would silently differ.\n"
            "What to do: remove the hook before merge/prepare and register it on the result, or wrap the "
            "model in another nn.Module (hooks on submodules are traced or kept).")


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy (repq_fx never modifies its input), or a CaptureError saying why there is none."""
    try:
        return copy.deepcopy(model)
    except Exception as e:
        todo = "make copy.deepcopy(model) work."
        if any(type(h).__name__ == "WeightNorm" for m in model.modules() for h in m._forward_pre_hooks.values()):
            todo = ("torch.nn.utils.weight_norm (deprecated) leaves a computed weight that cannot be copied: use "
                    "torch.nn.utils.parametrizations.weight_norm, or torch.nn.utils.remove_weight_norm first "
                    "(or run one forward pass under torch.no_grad()).")
        raise CaptureError(
            f"could not copy {type(model).__name__} (repq_fx works on a deep copy and never modifies the model): "
            f"{type(e).__name__}: {e}\nWhat to do: {todo}") from e

