"""The second capture front end: ``torch.export`` for models ``torch.fx.symbolic_trace`` cannot trace.

Slice assignment into a padded tensor (the official DBB and ECBSR code), ``int()`` or tuple
unpacking on shapes (OREPA), branches on ``x.get_device()``: symbolic tracing fails on all of
them, while ``torch.export`` (non-strict, so plain Python runs; training IR, so BatchNorm and
dropout keep their train-mode form) records the ATen ops the model actually runs.

:func:`capture_export`

1. exports a deep copy of the model with the example inputs (batch and spatial sizes dynamic,
   ``Dim.AUTO``: export keeps them symbolic unless the model fixes them), functionalizes it
   (``run_decompositions({})``: slice assignment becomes ``slice_scatter``; skipped where rewriting
   its in-place ops suffices, :mod:`.in_place`), and
2. canonicalizes the ATen graph into the canonical graph of the FX front end
   (:mod:`.aten_canonicalize`): parameters and buffers as ``get_attr`` of their original module
   paths (state_dict names are kept), BatchNorm as the mode-following ``ir.batch_norm``,
   slice-assigned borders as padding with a value (:mod:`.slice_padding`);
3. checks the result numerically against the model on the example inputs (eval mode; for a
   train-mode capture also train mode), and refuses with :class:`CaptureError` if they differ,
   rather than hand back a different model.

Train and eval. Export runs the model's Python once, so any ``if self.training:`` branch is
baked in. ``merge`` and ``explain`` therefore capture in eval mode (the function they describe);
``prepare`` captures in train mode, with BatchNorm and dropout mapped to modules that follow
``.train()``/``.eval()`` at run time. If the train-mode capture then differs from the model in
eval mode (some other branch on ``self.training``: GoogLeNet's auxiliary heads), ``prepare``
captures in eval mode instead and warns (:mod:`.modes`), as the FX front end does. A random op in
the train-mode capture (a hand-written DropPath) is refused: it would stay on in eval mode. A model that trains
with branches and evaluates with a kernel it merges in ``forward`` (ECBSR) is fine: ``merge``
captures the eval forward, ``prepare`` the train forward, checked against the eval forward.

DBB-style padding values computed from running statistics are kept as expressions on the
buffers, read after the BatchNorm has updated them, exactly as the model reads them, so the
capture equals the model in both modes and ``merge`` is exact. What ``prepare`` makes of it:
in eval mode the prepared model equals the model (running statistics everywhere); in train
mode the model itself is not one conv (its BN normalizes with batch statistics, its border
with running statistics), and the prepared model trains the one conv that is deployed (batch
statistics folded into the merged weight, the border padded consistently), so the two differ
at the border pixels in train mode. The FX front end behaves the same way.

Sizes. Where export had to fix an input size (the model calls ``int()`` on it, or the example
has size 1 in a dim other than the batch), the captured graph is only valid for that size, and
it checks this at run time (:func:`check_input_sizes` raises :class:`CaptureError`).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.node import has_side_effect
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_flatten

from ..errors import CaptureError, RepQError, first_line
from .aten_canonicalize import canonicalize_exported
from .example_inputs import batched_example, example_inputs_for, input_channels, unfilled_arguments
from .in_place import remove_in_place_ops
from .modes import mode_difference, warn_training_branch
from .canvas import Sizes

#: relative output difference above which the captured graph is not the model (per dtype)
_CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
_KEPT_META = ("nn_module_stack", "stack_trace", "tensor_meta")


@has_side_effect
def check_input_sizes(x: torch.Tensor, fixed: tuple[tuple[int, int], ...], where: str) -> None:
    """Raise unless ``x.shape[d] == n`` for every ``(d, n)`` in ``fixed`` (sizes export had to fix)."""
    for d, n in fixed:
        if x.shape[d] != n:
            raise CaptureError(
                f"{where} was captured with torch.export at input size {n} in dim {d} and only takes that size "
                f"(got {tuple(x.shape)}): the model computes something from that size in Python (int() on a "
                "shape), so export specialized it. Capture again with example_inputs of the size you run, or "
                "keep the shape arithmetic symbolic (x.shape[2] + 2 instead of int(x.shape[2]) + 2)")


def capture_export(model: nn.Module, example_inputs: Sequence[Any] | None = None, *, mode: str = "train",
                   fx_error: BaseException | None = None) -> fx.GraphModule:
    """The canonical GraphModule of a deep copy of ``model``, captured with ``torch.export``.

    ``mode``: ``"train"`` (for ``prepare``: BatchNorm and dropout in their train form, mapped to
    modules that follow the mode) or ``"eval"`` (for ``merge``/``explain``). ``fx_error``: why the
    FX front end failed (kept in the message and in ``gm.meta``).
    """
    if mode not in ("train", "eval"):
        raise AssertionError(f"mode must be 'train' or 'eval', got {mode!r}")
    name = type(model).__name__
    inputs = example_inputs_for(model, example_inputs)
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise CaptureError("the export front end takes tensor example_inputs only; got "
                           + ", ".join(type(x).__name__ for x in inputs))
    export_inputs = batched_example(inputs)  # export fixes sizes 0 and 1 (it specializes them)
    root = copy.deepcopy(model).train(mode == "train")
    try:
        ep = _export(root, export_inputs, name, fx_error)
    except CaptureError as e:
        if example_inputs is not None:
            raise
        raise CaptureError(f"{e}\n(The example input {tuple(inputs[0].shape)} was made up, its channel count from "
                           "the first convolution or norm that reads the input. What to do: pass "
                           "example_inputs=(x,) with x a real input of the model.)") from e
    sizes = _size_assignments(ep, export_inputs)
    try:
        gm = canonicalize_exported(ep, root, mode=mode, sizes=sizes, name=name)
    except RepQError:
        raise
    except Exception as e:  # a bug or an op combination we did not foresee: refuse, never guess
        raise CaptureError(f"canonicalizing the torch.export graph of {name} failed: {type(e).__name__}: {e}") from e
    _guard_fixed_sizes(gm, name)
    for node in gm.graph.nodes:  # export's fake tensors and symbols stay behind (they do not deepcopy)
        node.meta = {k: v for k, v in node.meta.items() if k in _KEPT_META}
    gm.train(mode == "train")
    eval_difference = _check_against_model(gm, model, inputs, name, mode)
    if eval_difference:  # a train-mode capture whose path differs from model.eval()'s: capture eval instead
        eval_gm = capture_export(model, example_inputs, mode="eval", fx_error=fx_error)
        warn_training_branch(name, mode_difference(gm, eval_gm) or f"the outputs ({eval_difference})", stacklevel=6)
        return eval_gm
    gm.meta["repq_front_end"] = "export"
    gm.meta["repq_capture_note"] = (
        "torch.fx symbolic tracing failed: " + first_line(fx_error) if fx_error is not None else "")
    return gm


def _dynamic_shapes(inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...]:
    auto = torch.export.Dim.AUTO
    shapes = []
    for x in inputs:
        dims = range(x.dim())
        shapes.append({d: auto for d in dims if not (x.dim() == 4 and d == 1) and x.shape[d] > 1})
    return tuple(shapes)


def _export(root: nn.Module, inputs: tuple[torch.Tensor, ...], name: str, fx_error: BaseException | None) -> Any:
    bn_momentum = []
    for m in root.modules():  # BN with momentum=None reads float(num_batches_tracked) in train mode
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None and m.training:
            bn_momentum.append(m)
            m.momentum = 0.1  # export-time only: the captured graph calls the module, with momentum None
    try:
        try:
            ep = torch.export.export(root, inputs, dynamic_shapes=_dynamic_shapes(inputs), strict=False)
        except Exception:
            ep = torch.export.export(root, inputs, strict=False)
        if remove_in_place_ops(ep, root):
            return ep  # already functional: no second trace (run_decompositions was 2/3 of a capture)
        return ep.run_decompositions({})
    except Exception as e:
        reason = f"{type(e).__name__}: {_first_lines(e, 12)}"
        prefix = ""
        if fx_error is not None:
            prefix = f"{fx_error}\n\nThe torch.export front end (capture='auto' falls back to it) also failed:\n"
        raise CaptureError(f"{prefix}torch.export could not capture {name}: {reason}") from e
    finally:
        for m in bn_momentum:
            m.momentum = None


def _size_assignments(ep: Any, inputs: tuple[torch.Tensor, ...]) -> list[Sizes]:
    """The example's sizes, and other sizes (to tell a padding from a write that fits one size only)."""
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user = [n for n, spec in zip(placeholders, ep.graph_signature.input_specs)
            if spec.kind.name == "USER_INPUT"]
    env0: dict[Any, int] = {}
    for node, x in zip(user, inputs):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for s, actual in zip(val.shape, x.shape):
            if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                env0[s.node.expr] = int(actual)
    if not env0:
        return [Sizes({})]
    return [Sizes(env0), Sizes({k: v + 5 for k, v in env0.items()}), Sizes({k: 2 * v + 3 for k, v in env0.items()})]


def _guard_fixed_sizes(gm: fx.GraphModule, name: str) -> None:
    """A run-time check for input sizes export specialized (where the model fixed them)."""
    for ph in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        fixed = tuple((d, int(s)) for d, s in enumerate(val.shape)
                      if is_concrete_int(s) and not (val.dim() == 4 and d == 1))
        if fixed:
            with gm.graph.inserting_after(ph):
                gm.graph.call_function(check_input_sizes, (ph, fixed, name))
    gm.recompile()


def _check_against_model(gm: fx.GraphModule, model: nn.Module, inputs: tuple[torch.Tensor, ...], name: str,
                         mode: str) -> str:
    """The captured graph computes the model: eval mode always, train mode too for a train capture.

    Returns how a train-mode capture differs from the model in eval mode ("" if it does not; the model
    branches on ``self.training`` beyond BatchNorm and dropout); raises :class:`CaptureError` otherwise."""
    reference = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            expected = reference(*inputs)
            got = ShapeProp(gm.eval()).propagate(*inputs)  # also records shapes for the pattern pass
    except RepQError:
        raise
    except Exception as e:
        raise CaptureError(f"running the torch.export capture of {name} on example_inputs failed: "
                           f"{type(e).__name__}: {e}") from e
    finally:
        gm.train(mode == "train")
    bad = _difference(got, expected)
    if bad and mode == "train":
        return bad
    if bad:
        raise CaptureError(f"the torch.export capture of {name} differs from the model in eval mode ({bad}): this "
                           "is a gap in the export front end; use capture='fx' or report the model")
    if mode != "train":
        return ""
    trained_ref, trained_gm = copy.deepcopy(model).train(), copy.deepcopy(gm).train()
    with torch.no_grad():
        state = torch.random.get_rng_state()
        expected = trained_ref(*inputs)
        torch.random.set_rng_state(state)
        got = trained_gm(*inputs)
    bad = _difference(got, expected)
    if bad:
        raise CaptureError(f"the torch.export capture of {name} differs from the model in train mode ({bad}); "
                           "use capture='fx' or make the train-mode forward deterministic")
    return ""


def _difference(got: Any, expected: Any) -> str:
    a, _ = tree_flatten(got)
    b, _ = tree_flatten(expected)
    if len(a) != len(b):
        return f"{len(a)} outputs instead of {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if isinstance(y, torch.Tensor):
            if not isinstance(x, torch.Tensor) or x.shape != y.shape:
                return f"output {i} has shape {getattr(x, 'shape', None)} instead of {tuple(y.shape)}"
            if not y.is_floating_point():
                if not torch.equal(x, y):
                    return f"output {i} differs"
                continue
            tol = _CHECK_TOL.get(y.dtype, 1e-4)
            scale = max(float(y.abs().max()), 1e-30) if y.numel() else 1.0
            err = float((x.double() - y.double()).abs().max()) / scale if y.numel() else 0.0
            if not err <= tol:
                return f"output {i}: relative error {err:.2e}"
    return ""


def _first_lines(e: BaseException, n: int) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    text = "\n".join(lines[:n])
    return text + ("\n..." if len(lines) > n else "")


__all__ = ["capture_export", "check_input_sizes", "example_inputs_for", "input_channels", "unfilled_arguments"]
