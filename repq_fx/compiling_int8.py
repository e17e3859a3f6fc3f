"""Int8 inference inside PyTorch: a lowered model through ``torch.compile`` as oneDNN int8 convolutions.

Traced, a lowered model is PyTorch's quantized reference representation (:mod:`repq_fx.quant.lowered`):
``quantize_per_tensor``/``dequantize_per_tensor`` around float ``conv2d``/``linear`` whose weights are
``dequantize_per_channel`` of int8 constants, the graph PT2E's ``convert_pt2e`` produces. With
inductor's ``freezing`` on (weights become constants), the x86 quantization passes that
``X86InductorQuantizer`` registers (TorchAO's ``torchao.quantization.pt2e.inductor_passes.x86``; they left
``torch._inductor`` for TorchAO) prepack each int8 weight for oneDNN and rewrite every
``dequantize -> conv2d -> [relu] -> quantize`` into one ``onednn.qconv_pointwise`` (uint8 in, uint8 out,
ReLU fused) and every linear into ``onednn.qlinear_pointwise``. :func:`compile_int8` is that flow for
a lowered model; nothing here writes a kernel.

What the copy it compiles changes, and why (the integers are the lowered model's throughout):

- weights stored as uint8 (``QConfig(target="onnxruntime-u8u8")``) are traced as int8: oneDNN's int8
  convolution takes signed 8-bit weights only;
- activation grids narrower than 8 bits get an integer clamp after each quantize
  (:attr:`QuantizeDequantize.explicit_range`): the fused conv saturates at 0..255 only, because the passes
  drop the output quantize's range.

Exactness: oneDNN's u8s8 kernels on x86 CPUs without VNNI add each pair of ``uint8 * int8`` products in
16 bits (``VPMADDUBSW``) and saturate, as ONNX Runtime's do (measured on this project's AVX2 machine: full-range
weights behind 8-bit inputs came out up to 53439 accumulator units off; ``|w| <= 64`` exact, and
no weight scaling: odd weights behind small inputs exact). So the same static check as the ONNX export
(:mod:`repq_fx.export.saturation`) refuses weights that can overflow; the default target's grid
(``|w| <= 64`` behind 8-bit activations) never does. Where every layer passes it, the compiled model computes
the lowered model's integers: each layer within one output step of it (a float tie in the requantization
may round the other way); tests/test_pytorch_int8.py checks the outputs, and the 16-bit limit.

>>> import torch, torch.nn as nn, repq_fx
>>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
>>> _ = repq_fx.calibrate(q, [torch.randn(4, 3, 8, 8)])
>>> fast = compile_int8(repq_fx.lower(q))      # compiles on the first call (needs a C++ compiler)
>>> type(fast).__name__
'Int8CompiledModule'
"""
from __future__ import annotations

import copy
import functools
import platform
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import CompileError, ConfigError, SaturationError, first_few
from .quant.lowered import QuantizeDequantize, QuantizedConv2d, QuantizedLinear
from .targets import TARGETS, get_target

# inductor's counters: one per qconv/qlinear lowered to a oneDNN int8 op (unary: ReLU or none fused; binary: add)
_INT8_OP_COUNTERS = ("qconv_unary_lower_count", "qconv2d_binary_lower_count", "qlinear_unary_lower_count",
                     "qlinear_binary_lower_count")
_X86 = ("x86_64", "amd64", "i386", "i686")


class Int8CompiledModule(nn.Module):
    """The compiled int8 model: ``lowered`` (the copy traced as oneDNN int8 ops) and its compiled forward.

    ``forward`` runs the compiled code under ``torch.no_grad()`` and ``torch._inductor.config.patch(freezing=True)``:
    inductor folds the weights into constants only when gradients are off (an int8 model has no gradient
    to give), and it must see ``freezing`` in its global config wherever it compiles (torch 2.14:
    ``torch.compile(options={"freezing": True})`` alone leaves ``onednn.qconv_prepack`` unfolded in the graph
    and fails in inductor's fake tensor propagation).
    """

    def __init__(self, lowered: fx.GraphModule, compiled: Any) -> None:
        super().__init__()
        self.lowered = lowered
        self.__dict__["_compiled"] = compiled  # not a submodule: state_dict holds the weights once

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return self._compiled(*args, **kwargs)


def inductor_form(lowered: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``lowered`` (eval mode) whose traced form inductor's x86 passes turn into int8 oneDNN ops:
    int8 weight storage, uint8 activation storage, and an integer clamp after each quantize whose grid is
    narrower than 8 bits.

    >>> import torch, torch.nn as nn, repq_fx
    >>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3)), repq_fx.QConfig(act_bits=4))
    >>> _ = repq_fx.calibrate(q, [torch.randn(2, 3, 8, 8)])
    >>> form = inductor_form(repq_fx.lower(q))
    >>> [m.explicit_range for m in form.modules() if isinstance(m, QuantizeDequantize)]
    [True, True]
    """
    if not isinstance(lowered, fx.GraphModule) or not _integer_layers(lowered):
        raise ConfigError("compile_int8 needs a model returned by repq_fx.lower (a GraphModule with "
                          f"QuantizedConv2d/QuantizedLinear layers); got {type(lowered).__name__} without any")
    form = copy.deepcopy(lowered).eval()
    for m in form.modules():
        if isinstance(m, (QuantizedConv2d, QuantizedLinear)):
            m.set_weight_container("int8")
        elif isinstance(m, QuantizeDequantize):
            m.set_container("uint8")  # oneDNN's x86 int8 convs take uint8 activations (an xnnpack model's int8 shifts back)
            m.explicit_range = True
    return form


@functools.lru_cache(None)
def register_x86_passes() -> None:
    """Register the x86 int8 passes with inductor's freezing pattern matcher (once per process).

    They act only in graphs compiled with ``freezing`` on. Raises :class:`~repq_fx.errors.CompileError`
    where they cannot run: no TorchAO, no oneDNN, not an x86 CPU.

    >>> register_x86_passes()
    """
    machine = platform.machine().lower()
    if machine not in _X86:
        raise CompileError(f"compile_int8 runs oneDNN's x86 int8 kernels; this is a {machine} CPU. Export the model "
                           "with repq_fx.export_onnx and run it in ONNX Runtime instead")
    if not torch.backends.mkldnn.is_available():
        raise CompileError("compile_int8 needs PyTorch built with oneDNN (torch.backends.mkldnn.is_available() is "
                           "False); install the standard x86 CPU wheel of torch")
    try:
        from torchao.quantization.pt2e.inductor_passes.x86 import _register_quantization_weight_pack_pass
    except ImportError as e:
        raise CompileError("compile_int8 needs TorchAO, which holds inductor's x86 int8 passes since they left "
                           f"torch._inductor: pip install 'repq_fx[inductor]' (or torchao) ({e})") from e
    _register_quantization_weight_pack_pass()


def compile_int8(lowered: fx.GraphModule, example_inputs: Sequence[Any] | None = None, *,
                 allow_vnni_only: bool = False, **compile_kwargs: Any) -> Int8CompiledModule:
    """``lowered`` (from :func:`repq_fx.lower`) compiled by ``torch.compile`` (inductor, CPU) so that every
    integer conv and linear runs as one oneDNN int8 op on uint8 activations, ReLU and requantization fused.

    Inductor's ``freezing`` is switched on for this module only (a ``torch._inductor.config.patch`` around each
    call, so also when it recompiles for new shapes); other
    ``torch.compile`` arguments pass through (``dynamic``, ``fullgraph``, ``options``; a ``mode`` becomes the
    options it stands for). ``dynamic`` is ``False`` where a conv reads a single input channel (grey images):
    there, with a symbolic batch, torch 2.14's int8 conv returns another memory layout than inductor expects.
    The result is an :class:`Int8CompiledModule` in eval mode that runs without
    autograd; it compiles a copy of ``lowered`` with the weights frozen into constants, so later changes
    to ``lowered`` do not reach it. It runs on x86 CPUs with TorchAO installed; inductor needs a C++ compiler.

    Weights whose 16-bit pair sums can overflow on x86 CPUs without VNNI (full-range 8-bit weights: models
    prepared for every target but ``"onnxruntime"``, i.e. ``"onnxruntime-u8u8"``, ``"onnxruntime-vnni"``,
    ``"tensorrt"`` and ``"xnnpack"``) raise a
    :class:`~repq_fx.errors.SaturationError`; ``allow_vnni_only=True`` compiles them with a warning (exact only
    on CPUs with VNNI). With ``example_inputs`` it compiles now, runs them once and raises
    :class:`~repq_fx.errors.CompileError` unless every integer layer became a oneDNN int8 op (inductor's own
    counters); without, it compiles on the first call.

    >>> import torch, torch.nn as nn, repq_fx
    >>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> _ = repq_fx.calibrate(q, [torch.randn(4, 3, 8, 8)])
    >>> fast = repq_fx.compile_int8(repq_fx.lower(q))   # fast(x) compiles on its first call
    >>> fast.training
    False
    """
    form = inductor_form(lowered)
    _check_pair_sums(form, allow_vnni_only, getattr(lowered, "repq_target", None))
    register_x86_passes()
    mode = compile_kwargs.pop("mode", None)
    options = dict(compile_kwargs.pop("options", None) or {})
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode, compile_kwargs.get("dynamic")), **options}
    if options.get("freezing") is False:
        raise ConfigError("compile_int8 needs inductor's freezing (weights as constants for oneDNN); do not pass "
                          "options={'freezing': False}")
    single = [n.target for n in _integer_layers(form) if isinstance(form.get_submodule(n.target), QuantizedConv2d)
              and form.get_submodule(n.target).weight.shape[1] * form.get_submodule(n.target).groups == 1]
    if single:  # torch 2.14: with a symbolic batch, oneDNN's qconv on a 1-channel input returns another layout
        if compile_kwargs.get("dynamic"):  # than inductor's meta function expects (AssertionError on the strides)
            raise ConfigError(f"compile_int8 cannot compile {single[0]} (a conv on a single input channel) for "
                              "dynamic shapes with this torch; pass dynamic=False (one compilation per input shape)")
        compile_kwargs["dynamic"] = False
    compiled = torch.compile(form, backend="inductor", options={**options, "freezing": True}, **compile_kwargs)
    module = Int8CompiledModule(form, compiled).eval()
    if example_inputs is not None:
        ops = int8_ops_compiled(module, tuple(example_inputs))
        layers = len(_integer_layers(form))
        if ops < layers:
            raise CompileError(f"inductor ran {ops} of the {layers} integer layers as oneDNN int8 ops; the others "
                               "stayed float convolutions (an inductor or TorchAO version whose patterns no longer "
                               "match repq_fx's graphs?). The lowered model itself still runs eagerly")
    return module


def int8_ops_compiled(module: nn.Module, example_inputs: tuple[Any, ...]) -> int:
    """Run ``module`` (an :class:`Int8CompiledModule`, not yet compiled for these inputs) once on
    ``example_inputs`` and count the oneDNN int8 convs and linears inductor generated meanwhile.

    Inductor counts each op it lowers, also when its graph cache supplies the compiled code.
    """
    from torch._dynamo.utils import counters

    before = {k: counters["inductor"][k] for k in _INT8_OP_COUNTERS}
    module(*example_inputs)
    return sum(counters["inductor"][k] - before[k] for k in _INT8_OP_COUNTERS)


def _integer_layers(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), (QuantizedConv2d, QuantizedLinear))]


def _check_pair_sums(form: fx.GraphModule, allow_vnni_only: bool, target: str | None) -> None:
    from .export.saturation import int16_pair_overflows  # here: repq_fx.export imports onnx, optional

    overflows = int16_pair_overflows(form)
    if not overflows:
        return
    listed = first_few(overflows)
    trained = (f"The model was prepared for target {target!r}, a grid for {get_target(target).summary.split(':')[0]}"
               f" (run it there: repq-fx export). " if target in TARGETS else "")
    if not allow_vnni_only:
        raise SaturationError(
            f"{len(overflows)} int8 layers can overflow the 16-bit pair sums of oneDNN's u8s8 kernels on x86 CPUs "
            f"without VNNI ({listed}). {trained}Prepare the model with QConfig(target='onnxruntime') to train a "
            "grid every x86 CPU computes exactly, or pass allow_vnni_only=True to run it on CPUs with VNNI only")
    warnings.warn(f"compile_int8: {len(overflows)} int8 layers are exact only on x86 CPUs with VNNI ({listed})",
                  RuntimeWarning, stacklevel=3)


__all__ = ["Int8CompiledModule", "compile_int8", "inductor_form", "register_x86_passes", "int8_ops_compiled"]
