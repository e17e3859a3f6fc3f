"""The public entry points: ``explain`` and ``merge`` (``prepare``/``lower`` build on the same analysis).

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
>>> merged = merge(model)
>>> x = torch.randn(1, 3, 8, 8)
>>> bool(torch.allclose(merged(x), model(x), atol=1e-5))
True
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch
import torch.fx as fx

if TYPE_CHECKING:
    import onnx

from .batches import forward_inputs
from .capture import capture as _capture
from .checks import check_graph, check_model, graph_warnings, unwrap_parallel
from .config import QConfig
from .errors import ConfigError, NotPreparedError, RepQError, ZeroRangeWarning
from .passes.lower import lower_graph
from .passes.merge import merge_blocks
from .passes.prepare import prepare_graph
from .quant import zero_range
from .quant.fake_quant import STEP_FLOOR, ActFakeQuant, fake_quantizers
from .ir import param_dtype
from .patterns.blocks import NumericValues, find_blocks
from .report import Report, build_report


def explain(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None, capture: str = "auto") -> Report:
    """What ``merge`` would merge, with each block's branches, and why anything is left alone.

    ``capture`` picks the front end: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``, for
    models tracing cannot follow: slice assignment, ``int()`` on shapes, ``x.get_device()``) or
    ``"auto"`` (FX, falling back to export); ``report.front_end`` says which one was used.

    >>> import torch.nn as nn
    >>> print(explain(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))))  # doctest: +NORMALIZE_WHITESPACE
    Sequential: 1 of 1 blocks merged into one conv each, 1 convs -> 1
    block   branches        convs  merged  reason
    <root>  conv3x3 -> bn   1      -> 3x3
    """
    model = unwrap_parallel(model, "explain")
    check_model(model, "explain")
    gm = _capture(model, example_inputs, front_end=capture, mode="eval")
    analysis = find_blocks(gm)
    convs = [name for name, m in model.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    report = build_report(type(model).__name__, gm, analysis, warnings=graph_warnings(gm, analysis), convs=convs)
    return dataclasses.replace(report, front_end=gm.meta.get("repq_front_end", "fx"),
                               capture_note=gm.meta.get("repq_capture_note", ""))


def merge(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None,
          capture: str = "auto") -> fx.GraphModule:
    """The float deploy model: every mergeable block as one conv (BN folded with running statistics).

    The result equals ``model.eval()``; ``model`` itself is not modified. It is returned in eval mode.
    ``capture``: ``"auto"`` | ``"fx"`` | ``"export"`` (see :func:`explain`); export captures in eval mode.
    """
    model = unwrap_parallel(model, "merge")
    check_model(model, "merge")
    gm = _capture(model, example_inputs, front_end=capture, mode="eval")
    analysis = find_blocks(gm)
    check_graph(gm, analysis, "merge")
    merged = merge_blocks(gm, analysis)
    return merged.eval()


def prepare(model: torch.nn.Module, config: QConfig | None = None,
            example_inputs: Sequence[Any] | None = None, capture: str = "auto") -> fx.GraphModule:
    """The RepQ QAT model: each block is ``conv2d(Q_a(x), Q_w(M(theta)), b(theta))``.

    ``M(theta)`` is the block's merged weight as FX nodes on the block's own parameters, so
    training updates the original branch parameters while the quantizer sees the deploy
    kernel. Parameter and buffer names are those of ``model``; the result follows
    ``.train()``/``.eval()`` at run time. ``model`` itself is not modified. ``capture``: ``"auto"`` |
    ``"fx"`` | ``"export"`` (see :func:`explain`). The model is captured in train mode, BatchNorm and dropout
    as modules that follow the mode; a model whose forward takes another path in train mode than in eval mode
    beyond them (``if self.training:`` auxiliary heads) is captured in eval mode instead, so that the prepared
    model always computes ``model.eval()``'s outputs, with a :class:`~repq_fx.errors.TrainingBranchWarning`
    naming where (``repq_fx.capture.modes``).

    >>> import torch, torch.nn as nn
    >>> qmodel = prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    >>> qmodel(torch.randn(2, 3, 8, 8)).shape
    torch.Size([2, 8, 6, 6])
    """
    config = config or QConfig()
    if not isinstance(config, QConfig):
        raise ConfigError(f"config must be a repq_fx.QConfig; got {type(config).__name__}")
    model = unwrap_parallel(model, "prepare")
    check_model(model, "prepare")
    gm = _capture(model, example_inputs, front_end=capture, mode="train")
    # blocks found in the model's own dtype, as prepare_graph emits them (float64 is for merge's exactness)
    analysis = find_blocks(gm, NumericValues(gm, dtype=param_dtype(gm)))
    check_graph(gm, analysis, "prepare")
    qmodel = prepare_graph(gm, config, analysis)
    qmodel.train(model.training)
    qmodel.repq_config = config
    return qmodel


def calibrate(qmodel: torch.nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> int:
    """Fit every quantizer's step to data; returns the number of batches seen.

    Activation ranges come from the float activations of ``batches`` (fake quant off), then each
    weight step from the weights of one more forward, in the mode ``qmodel`` is in when called:
    train mode (a model about to be trained: BN batch statistics, the merged weights training will
    quantize) or eval mode (a trained model quantized after training: running statistics). The two
    differ most on a freshly initialised model, whose running statistics (0 and 1) say nothing about
    its activations: steps fitted in eval mode there clip most of what training computes, and one SGD
    step can push a weight step below zero. BN running statistics, other buffers outside the
    quantizers and the random number generator are left as they were. A learned step whose data
    had no range (all zeros: a zero-initialised BN gamma or layer scale) starts from the step of
    neighbouring data, with a :class:`~repq_fx.errors.ZeroRangeWarning` naming it
    (:mod:`repq_fx.quant.zero_range`).

    Each batch becomes ``forward``'s inputs by the first rule that fits (``k``: the number of inputs
    ``forward`` requires; see :mod:`repq_fx.batches`): a Tensor is the one input; a dict gives keyword
    inputs; a tuple or list whose first item is a tuple, list or dict is ``(inputs, target, ...)``;
    any other tuple or list gives its first ``k`` items as the inputs and leaves the rest (targets)
    out. A batch that fits no rule raises :class:`RepQError` saying what forward takes.

    >>> import torch, torch.nn as nn
    >>> qmodel = prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> data = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))]   # (input, target) pairs
    >>> calibrate(qmodel, data)
    1
    >>> class TwoInputs(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.rgb, self.depth = nn.Conv2d(3, 8, 3), nn.Conv2d(1, 8, 3)
    ...     def forward(self, rgb, depth):
    ...         return self.rgb(rgb) + self.depth(depth)
    >>> qmodel = prepare(TwoInputs())
    >>> rgb, depth, target = torch.randn(4, 3, 8, 8), torch.randn(4, 1, 8, 8), torch.zeros(4)
    >>> calibrate(qmodel, [(rgb, depth), (rgb, depth, target), {"rgb": rgb, "depth": depth}, ((rgb, depth), target)])
    4
    """
    acts = _activation_quantizers(qmodel)
    quantizers = fake_quantizers(qmodel)
    mode = qmodel.training
    with _model_state_kept(qmodel), torch.no_grad(), zero_range.collected() as no_range:
        seen, inputs = _observe_activations(qmodel, quantizers, acts, batches, max_batches)
        if inputs is None:
            raise RepQError("calibrate() got no batches: pass an iterable of input tensors (or (input, target) "
                            "tuples, tuples of inputs, dicts of keyword inputs)")
        for q in acts:
            if torch.isfinite(q.min_val):
                q.init_from_range()
        try:  # weight steps from the weights of this mode; activation steps stay as just set
            for q in acts:
                q.train(False)
            qmodel(*inputs[0], **inputs[1])
        finally:
            qmodel.train(mode)
        _steps_for_zero_ranges(quantizers, no_range)
    return seen


def _activation_quantizers(qmodel: torch.nn.Module) -> list[ActFakeQuant]:
    """The activation quantizers of a prepared model; :class:`NotPreparedError` when there are none."""
    acts = [q for q in fake_quantizers(qmodel) if isinstance(q, ActFakeQuant)]
    if not acts:
        if isinstance(getattr(qmodel, "repq_config", None), QConfig):
            raise NotPreparedError(f"calibrate(): this prepared {type(qmodel).__name__} has nothing to quantize "
                                   "(no conv or linear outside QConfig.skip); it runs in float as it is")
        raise NotPreparedError("calibrate() needs a model returned by repq_fx.prepare (no fake quantizers found)")
    return acts


def _observe_activations(qmodel: torch.nn.Module, quantizers: list[Any], acts: list[ActFakeQuant],
                         batches: Iterable[Any], max_batches: int | None
                         ) -> tuple[int, tuple[tuple[Any, ...], dict[str, Any]] | None]:
    """Run ``batches`` in float (every quantizer off and reset, the activation quantizers observing their
    ranges); returns how many ran and the last one's ``forward`` inputs (None: no batch)."""
    enabled = [bool(q.enabled) for q in quantizers]
    seen, inputs = 0, None
    try:
        for q in quantizers:
            q.enable(False)
            q.reset()  # ranges and steps come from these batches only
        for q in acts:
            q.set_observing(True)
        for batch in batches:
            inputs = forward_inputs(qmodel, batch)
            qmodel(*inputs[0], **inputs[1])
            seen += 1
            if max_batches is not None and seen >= max_batches:
                break
    finally:
        for q in acts:
            q.set_observing(False)
        for q, on in zip(quantizers, enabled):
            q.enable(on)
    return seen, inputs


def _steps_for_zero_ranges(quantizers: list[Any], reported: list[str]) -> None:
    """A learned step whose whole tensor had no range takes the median step of the model's other quantizers
    of the same kind and grid; one :class:`~repq_fx.errors.ZeroRangeWarning` names every quantizer concerned."""
    if not reported:
        return
    for q in quantizers:
        if not q.zero_range:
            continue
        peers = [p for p in quantizers if type(p) is type(q) and not p.zero_range and p.learned
                 and (p.quant_min, p.quant_max) == (q.quant_min, q.quant_max)]
        step = zero_range.median_step(peers, STEP_FLOOR)
        if step is not None:
            q.scale.fill_(step)
    warnings.warn(zero_range.message(reported), ZeroRangeWarning, stacklevel=3)


@contextlib.contextmanager
def _model_state_kept(qmodel: torch.nn.Module) -> Iterator[None]:
    """Buffers outside the fake quantizers (BN running statistics, ...) and the random number
    generators as they were on entry, whatever forwards run inside (train mode updates them)."""
    inside = {id(t) for q in fake_quantizers(qmodel) for t in q.buffers()}
    kept = [(b, b.detach().clone()) for b in qmodel.buffers() if id(b) not in inside]
    cuda = sorted({t.device.index or 0 for t in itertools.chain(qmodel.parameters(), qmodel.buffers())
                   if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in kept:
                    buffer.copy_(value)


def lower(qmodel: fx.GraphModule) -> fx.GraphModule:
    """The deploy model: each quantized block as one int8 conv module, in eval mode.

    Each block's weight function is evaluated with running BN statistics, quantized on the
    trained grid (int8 per channel, int32 bias at scale ``s_x * s_w``) and replaced by one
    ``QuantizedConv2d``; activation quantizers become fixed quant-dequant modules. The output
    equals ``qmodel.eval()`` up to the int32 bias rounding. ``qmodel`` is not modified.

    >>> import torch, torch.nn as nn
    >>> qmodel = prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    >>> _ = calibrate(qmodel, [torch.randn(4, 3, 8, 8)])
    >>> deploy = lower(qmodel)
    >>> type(deploy.get_submodule("quantized_conv")).__name__
    'QuantizedConv2d'
    """
    return lower_graph(qmodel)


def export_onnx(lowered: fx.GraphModule, example_inputs: Sequence[Any] | torch.Tensor, path: str,
                target: str | None = None, check: bool = False) -> "onnx.ModelProto":
    """Write ``lowered`` (from :func:`lower`) as a QDQ ONNX model that ONNX Runtime runs in int8.

    Quantized convs become ``DequantizeLinear`` (int8 weight, int32 bias) -> ``Conv``, activation
    quantizers ``QuantizeLinear`` -> ``DequantizeLinear``; ONNX Runtime fuses them into
    ``QLinearConv``. The batch dimension is dynamic. Returns the ``onnx.ModelProto``.

    ``target`` (default: the ``QConfig.target`` the model was prepared with) is the integer scheme
    written (:mod:`repq_fx.targets`); weights its kernels cannot compute exactly on every CPU are
    refused with a :class:`~repq_fx.errors.SaturationError`. ``check=True`` runs the file in ONNX
    Runtime on ``example_inputs`` and raises :class:`~repq_fx.errors.ExportCheckError` unless
    99.9 % of the outputs are within one quantization step of ``lowered``'s; for a target with
    structural rules (``"tensorrt"``: symmetric int8 Q/DQ where TensorRT fuses them), it first checks
    the file's form (:mod:`repq_fx.export.tensorrt_check`).

    >>> import torch, torch.nn as nn, tempfile, os
    >>> qmodel = prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> _ = calibrate(qmodel, [torch.randn(2, 3, 8, 8)])
    >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    >>> export_onnx(lower(qmodel), (torch.randn(1, 3, 8, 8),), path, check=True).graph.input[0].name
    'input'
    """
    from .export.onnx_qdq import export_qdq  # onnx is an optional dependency

    model = export_qdq(lowered, example_inputs, path, target=target)
    if check:
        from .export.parity import check_onnx_runtime
        from .export.tensorrt_check import require_target_form
        from .targets import DEFAULT_TARGET, get_target

        require_target_form(model, path, lowered, get_target(target or getattr(lowered, "repq_target", DEFAULT_TARGET)))

        inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        check_onnx_runtime(path, lowered, inputs)
    return model


def enable_fake_quant(qmodel: torch.nn.Module) -> None:
    """Turn every fake quantizer of a prepared model on."""
    for q in fake_quantizers(qmodel):
        q.enable(True)


def disable_fake_quant(qmodel: torch.nn.Module) -> None:
    """Turn every fake quantizer of a prepared model off (the float RepQ model)."""
    for q in fake_quantizers(qmodel):
        q.enable(False)
