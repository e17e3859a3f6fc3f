"""The lower pass: each quantized conv/linear of a prepared model becomes one integer module.

For every ``conv2d(Q_a(x), Q_w(M(theta)), b(theta))`` (and ``linear``) of a prepared graph,
the weight function ``M(theta)`` and the bias are evaluated once in eval mode (running BN
statistics), the trained weight quantizer turns ``M`` into int8 values and per-channel steps
(exactly the ``Q_w(M)`` the model trained with), the bias becomes int32 at scale ``s_x * s_w``,
and the subgraph is replaced by one :class:`~repq_fx.quant.lowered.QuantizedConv2d`. Activation
quantizers become fixed :class:`~repq_fx.quant.lowered.QuantizeDequantize` modules. Everything
else (ReLU, pooling, adds, float layers left out by ``skip``) stays as it was.

>>> import torch, torch.nn as nn, repq_fx
>>> qmodel = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
>>> _ = repq_fx.calibrate(qmodel, [torch.randn(4, 3, 8, 8)])
>>> lowered = lower_graph(qmodel)
>>> [type(lowered.get_submodule(n.target)).__name__ for n in lowered.graph.nodes if n.op == "call_module"]
['QuantizeDequantize', 'QuantizedConv2d', 'ReLU', 'QuantizeDequantize']
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from ..ir import ConvView, attributes_read, free_module_path
from ..errors import NotCalibratedError, NotPreparedError, RepQError, StepCollapsedWarning
from ..targets import DEFAULT_TARGET, get_target
from ..quant.bn_stats import branch_statistics, input_moments
from ..quant.branch import LEGACY_ARGS, from_legacy
from ..quant.fake_quant import STEP_FLOOR, ActFakeQuant, WeightFakeQuant, collapse_message, fake_quantizers
from ..quant.lowered import QuantizeDequantize, QuantizedConv2d, QuantizedLinear

_INT32 = torch.iinfo(torch.int32)


def lower_graph(qmodel: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``qmodel`` with one integer module per quantized conv/linear, in eval mode."""
    _check_lowerable(qmodel)
    gm = copy.deepcopy(qmodel).eval()
    with torch.no_grad():
        for q in fake_quantizers(gm):
            if q.learned:  # what the next forward would do to a step an optimizer pushed below zero
                q.scale.clamp_(min=STEP_FLOOR)
    folder = _WeightFolder(gm)
    target = getattr(getattr(qmodel, "repq_config", None), "target", DEFAULT_TARGET)
    container = get_target(target).weight_container
    activations = get_target(target).activation_container
    lowered = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _LAYERS:
            if _quantized_inputs(gm, node) is not None:
                _lower_layer(gm, node, folder, container)
                lowered += 1
    for path, module in list(gm.named_modules()):
        if isinstance(module, ActFakeQuant):
            _set_module(gm, path, QuantizeDequantize(module.scale.detach().reshape(()).float(),
                                                     module.zero_point.reshape(()), module.quant_min,
                                                     module.quant_max, activations))
    gm.graph.eliminate_dead_code()
    leftover = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                   WeightFakeQuant)]
    if leftover:
        raise AssertionError(f"weight quantizers not lowered: {[n.target for n in leftover]}")
    gm.delete_all_unused_submodules()
    for name in [n for n, _ in gm.named_buffers() if n.rpartition(".")[2].startswith("_repq_const")]:
        owner, _, attr = name.rpartition(".")
        if not any(n.op == "get_attr" and n.target == name for n in gm.graph.nodes):
            delattr(gm.get_submodule(owner) if owner else gm, attr)
    _empty_unused_layers(gm)
    gm.graph.lint()
    gm.recompile()
    gm.lowered_layers = lowered
    gm.repq_target = target  # the integer scheme export writes
    return gm.eval()


def _check_lowerable(qmodel: nn.Module) -> None:
    from ..checks import check_finite

    quantizers = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, (ActFakeQuant, WeightFakeQuant))]
    if not isinstance(qmodel, fx.GraphModule) or not quantizers:
        raise NotPreparedError(f"lower() needs a model returned by repq_fx.prepare; {type(qmodel).__name__} "
                               "has no fake quantizers")
    cold = [n for n, m in quantizers if isinstance(m, ActFakeQuant) and not bool(m.initialized)]
    if cold:
        raise NotCalibratedError(f"{len(cold)} activation quantizers never saw data (first: {cold[0]!r}); "
                                 "run repq_fx.calibrate(qmodel, batches) or train it before lower()")
    off = [n for n, m in quantizers if not bool(m.enabled)]
    if off:
        raise NotCalibratedError(f"{len(off)} fake quantizers are disabled (first: {off[0]!r}), so the model was "
                                 "not trained on the grid lower() deploys; call repq_fx.enable_fake_quant(qmodel)")
    check_finite(qmodel, "lower")  # a diverged run: NaN/Inf parameters or BN statistics, named
    for n, m in quantizers:
        bad = ~torch.isfinite(m.scale) | ((m.scale <= 0) & (not m.learned))
        if bool(bad.any()):
            raise RepQError(f"quantizer {n!r} has a step size that is not a positive finite number "
                            f"({m.scale[bad][:3].tolist()}); training diverged or the state_dict is corrupt")
    collapsed = [(n, m) for n, m in quantizers if m.learned and bool((m.scale <= STEP_FLOOR).any())]
    if collapsed:  # lowered as trained (the deploy model is exactly the trained one), but not silently
        names = [n for n, _ in collapsed]
        more = f" (also: {', '.join(names[1:4])}{', ...' if len(names) > 4 else ''})" if len(names) > 1 else ""
        warnings.warn("lower(): " + collapse_message(collapsed[0][1], "went to or below zero in training and is "
                                                     "at the floor", path=names[0]) + more,
                      StepCollapsedWarning, stacklevel=3)


_LAYERS = (F.conv2d, F.linear)


def _quantized_inputs(gm: fx.GraphModule, node: fx.Node) -> tuple[ActFakeQuant, WeightFakeQuant] | None:
    x, w = node.args[0], node.args[1]
    if not (isinstance(x, fx.Node) and isinstance(w, fx.Node) and x.op == w.op == "call_module"):
        return None
    act, weight = gm.get_submodule(x.target), gm.get_submodule(w.target)
    if isinstance(act, ActFakeQuant) and isinstance(weight, WeightFakeQuant):
        return act, weight
    return None


def _lower_layer(gm: fx.GraphModule, node: fx.Node, folder: "_WeightFolder", container: str) -> None:
    act, wq = _quantized_inputs(gm, node)
    weight_node = node.args[1]
    is_conv = node.target is F.conv2d
    conv = _conv_view(node) if is_conv else None
    bias = conv.bias if conv is not None else _linear_bias(node)
    w = folder.value(weight_node.args[0], node)
    b = folder.value(bias, node) if isinstance(bias, fx.Node) else bias
    with torch.no_grad():
        w_fq = wq(w)  # the grid the model trained on (min-max: the step follows this weight)
        step = wq.scale.detach().float()
        shape = (-1,) + (1,) * (w.dim() - 1)
        w_int = torch.round(w_fq.float() / (step.reshape(shape) if step.numel() > 1 else step))
        w_int = w_int.clamp(wq.quant_min, wq.quant_max).to(torch.int8)
        step = step.expand(w.shape[0]) if step.numel() == 1 else step
        s_x = act.scale.detach().float().reshape(())
        bias_int = None
        if b is not None:
            bias_scale = (s_x * step).double()
            bias_q = torch.round(b.detach().double() / bias_scale)
            if bool((bias_q.abs() > _INT32.max).any()):
                raise RepQError(_bias_overflow_message(_layer_label(gm, weight_node), b.detach().double(),
                                                       float(s_x), step.double()))
            bias_int = bias_q.to(torch.int32)
    layer: nn.Module
    if conv is not None:
        layer = QuantizedConv2d(w_int, step, bias_int, s_x, conv.stride, conv.padding, conv.dilation, conv.groups,
                                weight_bits=wq.bits, weight_container=container)
    else:
        layer = QuantizedLinear(w_int, step, bias_int, s_x, weight_bits=wq.bits, weight_container=container)
    layer = layer.to(w.device)
    base = weight_node.target.rpartition(".")[0]
    path = free_module_path(gm, f"{base}.quantized_{'conv' if is_conv else 'linear'}" if base
                            else f"quantized_{'conv' if is_conv else 'linear'}")
    gm.add_submodule(path, layer)
    # the node itself becomes the module call, so the code keeps reading `<block>_conv = ...`
    node.op, node.target = "call_module", path
    node.args, node.kwargs = (node.args[0],), {}


def _empty_unused_layers(gm: fx.GraphModule) -> None:
    """Replace each float layer that the graph no longer calls or reads, but that still holds new
    modules (a linear's ``quantized_linear`` and quantizers live under its path), by a plain container
    of those modules: its float weight is dead, and would otherwise stay in ``state_dict``."""
    called = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for path, module in list(gm.named_modules()):
        if not path or not module._modules or not any(True for _ in module.parameters(recurse=False)):
            continue
        own = {f"{path}.{name}" for name in (*module._parameters, *module._buffers)}
        if path in called or own & called:  # still run, or its tensors still read
            continue
        container = nn.Module()
        for name, child in module.named_children():
            container.add_module(name, child)
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, container)


def _bias_overflow_message(layer: str, bias: torch.Tensor, s_x: float, s_w: torch.Tensor) -> str:
    """Which channel's bias overflows int32 at ``s_x * s_w``, and which of the two steps is the odd one.

    >>> print(_bias_overflow_message("head", torch.tensor([0.5, 3.0, 0.1]), 0.02, torch.tensor([0.005, 1e-6, 0.01])))
    ... # doctest: +NORMALIZE_WHITESPACE
    bias of head does not fit int32 at scale s_x * s_w: channel 1 has bias 3 and s_x * s_w = 0.02 * 1e-06;
    its weight step is 5e+03x smaller than the layer's median weight step (0.005): the weight step of that
    channel collapsed in training
    """
    ratio = bias.abs() / (s_x * s_w)
    c = int(ratio.argmax())
    text = (f"bias of {layer} does not fit int32 at scale s_x * s_w: channel {c} has bias {float(bias[c]):.3g} and "
            f"s_x * s_w = {s_x:.3g} * {float(s_w[c]):.3g}")
    for which, step in (("weight step of that channel", float(s_w[c])), ("input step", s_x)):
        if step <= STEP_FLOOR:
            return (f"{text}; the {which} collapsed in training: an optimizer update pushed it to or below zero "
                    f"and it is held at {STEP_FLOOR:.3g} (see the StepCollapsedWarning). Lower the learning rate "
                    "of the steps (parameters named '...fake_quant.scale') and calibrate in the mode you train in")
    median = float(torch.quantile(s_w.double(), 0.5))
    if float(s_w[c]) * 1000 < median:
        return (f"{text}; its weight step is {median / float(s_w[c]):.3g}x smaller than the layer's median weight "
                f"step ({median:.3g}): the weight step of that channel collapsed in training")
    return (f"{text}: the steps are too small for this bias (a bias that large next to the weights usually means "
            "training diverged); retrain with a lower learning rate, or leave the layer in float with "
            "QConfig(skip=(...))")


def _conv_view(node: fx.Node) -> ConvView:
    view = ConvView.of(node)
    if isinstance(view.padding, str):
        raise RepQError(f"{_label(node)} uses padding={view.padding!r}; lower() needs numeric padding")
    return view


def _linear_bias(node: fx.Node) -> Any:
    """``F.linear(input, weight, bias=None)``'s bias (linear is not a canonical op: it has no ir view)."""
    return node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)


def _layer_label(gm: fx.GraphModule, quantizer: fx.Node) -> str:
    """A weight quantizer's layer as the user knows it: the block's path, or the parameters its
    weight is computed from (``'weight_fake_quant_1' (weight from 2.weight)``)."""
    block = quantizer.target.rpartition(".")[0]
    if block:
        return block
    params = [a.target for a in attributes_read([quantizer])
              if a.target.rpartition(".")[2] in ("weight", "weight_orig")]
    if not params:
        return repr(quantizer.target)
    return f"{quantizer.target!r} (weight from {', '.join(sorted(params)[:3])}{', ...' if len(params) > 3 else ''})"


def _label(node: fx.Node) -> str:
    return f"node {node.name!r}"


class _Dynamic:
    """Marks a value that depends on the model input (cannot be folded into constants)."""

    def __init__(self, node: fx.Node) -> None:
        self.node = node


def _running_statistics(*args: Any) -> tuple:
    bn = (from_legacy(args) if len(args) == LEGACY_ARGS else args)[2]  # (x, branch, bn, ...); or an older graph's
    return bn.running_mean, bn.running_var


def _no_moments(x: Any, bn: nn.Module) -> tuple:
    return None, None


class _WeightFolder(fx.Interpreter):
    """Evaluates the weight side of a block (parameters, buffers, constants) with eval-mode BN statistics.

    Runs only the nodes a weight depends on (each once, shared between layers). A value computed
    from the model input is a :class:`_Dynamic` marker; the BN statistics, which read the block
    input only in train mode, are the running ones (``_EVAL_RULES``).
    """

    # What the weight side of a block computes in eval mode, where it reads the block input only
    # for its shape: BN statistics are the running ones.
    _EVAL_RULES: dict[Callable, Callable] = {branch_statistics: _running_statistics, input_moments: _no_moments}

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)

    def value(self, node: fx.Node, layer: fx.Node) -> torch.Tensor:
        """The value of ``node``, the weight or bias of ``layer``."""
        position = {n: i for i, n in enumerate(self.graph.nodes)}
        with torch.no_grad():
            for n in sorted(self._missing(node), key=position.__getitem__):
                self.env[n] = self.run_node(n)
        result = self.env[node]
        if isinstance(result, _Dynamic):
            raise RepQError(f"the weight of {_label(layer)} depends on the model input through node "
                            f"{result.node.name!r}; lower() can only fold weights computed from parameters")
        return result

    def _missing(self, root: fx.Node) -> set[fx.Node]:
        """``root`` and its ancestors not evaluated yet."""
        missing: set[fx.Node] = set()
        stack = [root]
        while stack:
            n = stack.pop()
            if n not in missing and n not in self.env:
                missing.add(n)
                stack.extend(n.all_input_nodes)
        return missing

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            return _Dynamic(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.op == "call_function" and n.target in self._EVAL_RULES:
            return self._EVAL_RULES[n.target](*args, **kwargs)
        dynamic = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, _Dynamic)), None)
        if dynamic is not None:
            return dynamic
        if n.op == "output":
            raise AssertionError(f"cannot fold {n.op} node {n.name}")
        return super().run_node(n)


def _set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, name, module)


__all__ = ["lower_graph"]
