"""The model zoo: every stage of repq_fx on torchvision and timm models nobody here picked.

Issues 12 and 13 are judged by this table. Per model, each stage runs in order and records whether
it succeeded, its seconds, and what it measured; a failing stage records the exception type, the
first line of its message and the deepest repq_fx frame, and the stages that do not need its result
still run (so one bug does not hide the next):

1. ``explain``: blocks merged / total, convs in merged blocks, duplicate block names, what is left out.
2. ``merge``: the model converted to float64, ``merge(model64)`` vs ``model64.eval()`` on the same
   input, relative error (max |diff| / max |expected| over every output tensor; target <= 1e-9), and
   the conv2d calls each one runs.
   ``exact`` (only with ``--exact``): ``prepare(model64)`` with fake quant off vs the model in eval
   and train mode (target <= 1e-9), again after moving every parameter by the same random step.
3. ``prepare``: ``prepare(model, QConfig())`` (the defaults), then ``repq_fx.calibrate`` on a few
   random batches; quantizers whose step calibration left at the float32-eps floor (a zero range,
   e.g. a residual branch whose last BN weight is initialised to 0).
4. ``train``: 2 SGD steps (lr 1e-3) in train mode, loss = mean of squares over every tensor of the
   output (tuples, dicts and namedtuples included); the loss must stay finite. Counts learned steps
   that training pushed to the float32-eps floor.
5. ``lower``: ``lower(qmodel)`` vs ``qmodel.eval()`` on the same input: max |diff| in output
   quantization steps, and argmax agreement for classification outputs (2-d ``[batch, classes]``);
   the same layer by layer, each layer fed the prepared model's own input (:func:`layer_steps`:
   a layer that is wrong vs one-step differences a chaotic random network grows end to end); the
   fake-quant model vs the float model; conv2d calls the lowered model still runs in float
   (outside ``QuantizedConv2d``), next to the convs ``explain`` lists as not merged.
6. ``export``: ``repq_fx.export_onnx`` (torch.onnx, dynamo) at batch 1, then ONNX Runtime (CPU EP,
   1 thread) on the batch: ORT's optimized graph must run one int8 conv (``QLinearConv`` or
   ``ConvInteger``) per ``QuantizedConv2d`` call of the lowered model and no float conv;
   ORT's output vs the lowered model (``repq_fx.export.parity.onnx_runtime_parity``): share of
   outputs within one output step, and the max in steps; the same with ORT's graph optimisations off
   (QDQ as float ops: tells the int8 kernel from the graph); and layer by layer
   (``repq_fx.export.parity.segment_parity``: each quantizer's segment cut out of the file and fed
   the lowered model's own values, so a wrong layer is told from a chaotic network).
7. ``latency`` (only with ``--latency``): ORT int8 vs ORT float32 of ``repq_fx.merge(model)``
   (``repq_fx.export.float_onnx``), batch 1, 1 thread, median of round-robin timed runs.

Inputs are ``randn`` images, ``--size`` square (64 by default), or the size timm's ``pretrained_cfg``
fixes (``fixed_input_size``, e.g. LeViT's attention biases), or :data:`SIZE_OVERRIDES`. Models are
built with random weights (``pretrained=False``). Their BN running statistics are then set from
random batches (:func:`calibrate_bn`): a freshly initialised BN has running mean 0 and variance 1
whatever its input really is, so activations grow or shrink by the layer's actual gain at every BN
and a deep random network's output is dominated by a few channels or overflows; with statistics
from data, every BN normalises what it really sees, as in a trained network. BN weights are then
multiplied by ``--bn-gain`` (1.0: no damping; the network stays as chaotic as random networks are).

Each model runs in a fresh subprocess with ``--timeout`` seconds (``--in-process`` to debug);
progress goes to stderr (tqdm), the markdown table to stdout; ``--json`` appends the raw records,
``--markdown FILE`` appends the table to FILE, ``--from-json`` prints the table of earlier records.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo.py --json zoo.jsonl
    .venv/bin/python benchmarks/zoo.py --models torchvision:resnet18 timm:repvgg_a0 --size 32 --stages explain merge
    .venv/bin/python benchmarks/zoo.py --models timm:repvgg_a0 --latency
    .venv/bin/python benchmarks/zoo.py --from-json zoo.jsonl --markdown RESULTS-zoo.md
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import repq_fx
from repq_fx.app.bench import round_robin
from repq_fx.export.float_onnx import export_float
from repq_fx.export.parity import onnx_runtime_parity, segment_parity
from repq_fx.export.parity import output_steps as parity_output_steps
from repq_fx.export.runtime import optimized_ops, session
from repq_fx.app.models import resolve_model
from repq_fx.quant.fake_quant import fake_quantizers
from repq_fx.quant.lowered import QuantizeDequantize, QuantizedConv2d

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
               "shufflenet_v2_x0_5", "squeezenet1_0", "googlenet", "convnext_tiny", "densenet121"]
TIMM = ["resnet18d", "efficientnet_b0", "ghostnetv2_100", "mobilevit_xs", "levit_128s", "convnext_atto",
        "regnetx_002", "repvit_m0_9", "repvgg_d2se",
        # one of each family the README lists as supported
        "repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m1", "ghostnetv3_050", "lcnetv2_small",
        # prepare decided structure from parameter values (--exact shows it once they move)
        "hgnetv2_b0"]
MODELS = [f"torchvision:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM]

STAGES = ("explain", "merge", "exact", "prepare", "train", "lower", "export", "latency")
DEFAULT_STAGES = ("explain", "merge", "prepare", "train", "lower", "export")  # --exact, --latency add theirs
# stage -> the stages whose results it needs (it is skipped when one of them failed)
NEEDS: dict[str, tuple[str, ...]] = {"explain": (), "merge": (), "exact": (), "prepare": (),
                                     "train": ("prepare",), "lower": ("prepare",), "export": ("lower",),
                                     "latency": ("export",)}

# spec -> input size, for models whose timm pretrained_cfg does not say what they need. Empty today:
# every model above runs at 64x64 except LeViT, whose cfg fixes 224.
SIZE_OVERRIDES: dict[str, int] = {}

WITHIN = 1.001  # "within one step": |diff| <= 1 step, with room for the float rounding of the division


# ---------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------

def build_model(spec: str) -> nn.Module:
    """The model ``spec`` names (``timm:NAME``, ``torchvision:NAME``, ...), random weights, eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "weights=None" init notices
        return resolve_model(spec).eval()


def input_size(spec: str, model: nn.Module, size: int) -> int:
    """``size``, unless timm fixes the model's input size (``fixed_input_size``) or it is overridden.

    >>> input_size("torchvision:resnet18", nn.Identity(), 64)
    64
    """
    if spec in SIZE_OVERRIDES:
        return SIZE_OVERRIDES[spec]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    return size


def calibrate_bn(model: nn.Module, shape: Sequence[int], gain: float = 1.0, batches: int = 3,
                 seed: int = 0) -> nn.Module:
    """Each BN's running statistics := those of its own input in eval mode on ``batches`` random
    batches, with every BN before it already set; then BN weights times ``gain``. Eval mode.

    One eval-mode forward: a pre-hook sets each BN's statistics from the input it receives, before
    it normalises it, so every BN output has mean ``beta`` and variance ``gamma**2`` on this data
    in eval mode, the mode merge, lower and export are compared in. (Statistics gathered in train
    mode, as ``tests/quantized_models.py`` does, are those of train-mode activations, which differ
    from what each BN sees in eval mode once the BNs before it use running statistics.) It does not
    tame everything: a channel that is almost constant on these batches gets a tiny variance and
    amplifies other inputs by up to ``1/sqrt(eps)``; deep networks whose residual sums are not
    normalised still explode on fresh inputs (timm repvgg_a0 at 32x32, repvgg_d2se at 64x64: the
    8-bit output grid then rounds every logit to one value, which the table flags).

    >>> _ = torch.manual_seed(0)
    >>> m = calibrate_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (8, 3, 8, 8))
    >>> y = m(torch.randn(8, 3, 8, 8)).detach()
    >>> bool(y.mean().abs() < 0.2 and (y.var() - 1).abs() < 0.2), m.training
    (True, False)
    """
    def set_statistics(bn: nn.modules.batchnorm._BatchNorm, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        bn.running_mean.copy_(x.mean(dims))
        bn.running_var.copy_(x.var(dims))

    g = torch.Generator().manual_seed(seed)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    data = torch.cat([torch.randn(*shape, generator=g, dtype=dtype) for _ in range(batches)])
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    handles = [bn.register_forward_pre_hook(set_statistics) for bn in norms]
    try:
        with torch.no_grad():
            model.eval()(data)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for bn in norms:
            if bn.weight is not None:
                bn.weight.mul_(gain)
    return model.eval()


def tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple, list, dict, namedtuple), in pytree order.

    >>> [t.shape for t in tensors({"a": torch.zeros(2), "b": (torch.zeros(3), None)})]
    [torch.Size([2]), torch.Size([3])]
    """
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def square_loss(output: Any) -> torch.Tensor:
    """Sum over the output's floating tensors of their mean square (a loss for any output structure).

    >>> float(square_loss((torch.ones(2), torch.full((3,), 2.0))))
    5.0
    """
    return sum(t.float().square().mean() for t in tensors(output) if t.is_floating_point())


def relative_error(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max |expected| over every tensor of two outputs of the same structure.

    >>> relative_error((torch.tensor([1.0, 2.0]),), (torch.tensor([1.0, 4.0]),))
    0.5
    """
    a, e = tensors(actual), tensors(expected)
    if len(a) != len(e):
        raise ZooCheckError(f"the outputs have {len(a)} and {len(e)} tensors")
    diff = max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, e))
    scale = max(float(y.double().abs().max()) for y in e)
    return diff / scale if scale else diff


class ZooCheckError(AssertionError):
    """A stage ran but what it produced is wrong (a mismatch, a NaN loss): recorded like an exception."""


# ---------------------------------------------------------------------------
# Counting convs and reading quantization steps
# ---------------------------------------------------------------------------

class ConvCalls(TorchFunctionMode):
    """Counts the conv2d calls of a forward (modules and functions alike), and those of them made
    inside a ``QuantizedConv2d`` (the integer conv simulates its arithmetic with a float conv2d)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.total = self.quantized = self.quantized_modules = 0
        self._depth = 0
        self._handles = []
        for m in model.modules():
            if isinstance(m, QuantizedConv2d):
                self._handles.append(m.register_forward_pre_hook(self._enter))
                self._handles.append(m.register_forward_hook(self._leave))

    def _enter(self, *_: Any) -> None:
        self._depth += 1
        self.quantized_modules += 1

    def _leave(self, *_: Any) -> None:
        self._depth -= 1

    @property
    def float_convs(self) -> int:
        return self.total - self.quantized

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.conv2d or func is torch.conv2d:
            self.total += 1
            self.quantized += self._depth > 0
        return func(*args, **(kwargs or {}))


def count_convs(model: nn.Module, x: torch.Tensor) -> ConvCalls:
    """Run ``model(x)`` (no grad) and count its conv2d calls."""
    with torch.no_grad(), ConvCalls(model) as calls:
        model(x)
    return calls


def output_steps(lowered: fx.GraphModule) -> list[float]:
    """The quantization step of each output tensor of a lowered model: that of the nearest
    ``QuantizeDequantize`` upstream of it (the output quantizer, or the last one before pooling or
    reshapes); the model's last quantizer where none is upstream. Empty if nothing is quantized."""
    def qdq(node: fx.Node) -> QuantizeDequantize | None:
        if node.op != "call_module":
            return None
        module = lowered.get_submodule(node.target)
        return module if isinstance(module, QuantizeDequantize) else None

    nodes = list(lowered.graph.nodes)
    every = [q for q in map(qdq, nodes) if q is not None]
    if not every:
        return []
    output = next(n for n in reversed(nodes) if n.op == "output")
    steps = []
    for leaf in (n for n in tree_leaves(output.args[0]) if isinstance(n, fx.Node)):
        seen, frontier, found = set(), [leaf], None
        while frontier and found is None:  # breadth first: the nearest quantizer
            nxt = []
            for n in frontier:
                if (q := qdq(n)) is not None:
                    found = q
                    break
                for i in n.all_input_nodes:
                    if i not in seen:
                        seen.add(i)
                        nxt.append(i)
            frontier = nxt
        steps.append(float((found or every[-1]).scale))
    return steps


def layer_steps(qmodel: fx.GraphModule, lowered: fx.GraphModule, x: torch.Tensor) -> tuple[float, str, float]:
    """Each activation quantizer of ``lowered`` fed the prepared model's own values: (max |diff| in
    that quantizer's steps, the worst quantizer's node name, share of outputs more than half a step off).

    ``lower`` keeps node names, so every quantizer of the lowered graph whose name is in the prepared
    graph is compared with the prepared model's value there and then passes that value on instead of
    its own: each layer (quantizer to quantizer) is checked on identical inputs, and a difference
    cannot grow from layer to layer. Large end-to-end differences with per-layer ones within a step
    are the chaos of the network; a per-layer difference above a step is a real mismatch of that layer.
    """
    prepared: dict[str, Any] = {}

    class Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            prepared[n.name] = value.clone() if isinstance(value, torch.Tensor) else None  # in-place ops follow
            return value

    worst, worst_name, off, total = 0.0, "", 0, 0

    class Forced(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            nonlocal worst, worst_name, off, total
            own = super().run_node(n)
            module = lowered.get_submodule(n.target) if n.op == "call_module" else None
            given = prepared.get(n.name)
            if not (isinstance(module, QuantizeDequantize) and isinstance(given, torch.Tensor)
                    and isinstance(own, torch.Tensor) and own.shape == given.shape):
                return own
            diff = (own.double() - given.double()).abs() / float(module.scale)
            if float(diff.max()) >= worst:
                worst, worst_name = float(diff.max()), n.name
            off += int((diff > 0.5).sum())
            total += diff.numel()
            return given.clone()

    with torch.no_grad():
        Record(qmodel).run(x)
        Forced(lowered).run(x)
    if not total:
        raise ZooCheckError("no quantizer of the lowered model has a counterpart of the same name in the prepared one")
    return worst, worst_name, off / total


def in_steps(actual: Any, expected: Any, steps: Sequence[float]) -> list[torch.Tensor]:
    """|actual - expected| / step, per output tensor (the last step for tensors beyond ``steps``)."""
    a, e = tensors(actual), tensors(expected)
    if len(a) != len(e):
        raise ZooCheckError(f"the outputs have {len(a)} and {len(e)} tensors")
    return [(x.double() - y.double()).abs().flatten() / steps[min(i, len(steps) - 1)]
            for i, (x, y) in enumerate(zip(a, e))]


def argmax_agreement(actual: Any, expected: Any) -> tuple[int, int] | None:
    """(rows with the same argmax, rows) over the 2-d ``[batch, classes]`` outputs; None if there are none."""
    same = total = 0
    for x, y in zip(tensors(actual), tensors(expected)):
        if x.dim() == 2 and x.shape[1] > 1 and x.is_floating_point():
            same += int((x.argmax(1) == y.argmax(1)).sum())
            total += x.shape[0]
    return (same, total) if total else None


# ---------------------------------------------------------------------------
# Running the stages
# ---------------------------------------------------------------------------

def error_info(exc: BaseException) -> dict[str, str]:
    """Exception type, the first line of its message, and the deepest traceback frame inside repq_fx."""
    package = str(Path(repq_fx.__file__).resolve().parent)
    frame = ""
    for f in traceback.extract_tb(exc.__traceback__):
        path = str(Path(f.filename).resolve())
        if path.startswith(package + os.sep):
            frame = f"repq_fx/{Path(path).relative_to(package).as_posix()}:{f.lineno} {f.name}"
    return {"type": type(exc).__name__, "message": first_line(str(exc)), "frame": frame}


def first_line(message: str) -> str:
    """The first line of an error message, without terminal colours; for torch.onnx's reports, whose
    first line only says which step failed, the cause under their ``## Exception summary`` instead.

    >>> first_line("Failed to export.\\x1b[96m step 1/3\\x1b[0m\\n## Exception summary\\n\\n<class 'E'>: bad\\n")
    "<class 'E'>: bad"
    """
    import re

    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", message).strip().splitlines()]
    if "## Exception summary" in lines:
        cause = next((line for line in lines[lines.index("## Exception summary") + 1:] if line), "")
        if cause:
            return cause[:300]
    return lines[0][:300] if lines else ""


class Stage:
    """Times one stage, records its warnings, and turns an exception into the stage's error."""

    def __init__(self, record: dict[str, Any], name: str, on_update: Callable[[dict[str, Any]], None]) -> None:
        self.record, self.name, self.on_update = record, name, on_update
        self.result: dict[str, Any] = {"ok": False, "seconds": None}

    def __enter__(self) -> dict[str, Any]:
        self.record["stages"][self.name] = self.result
        self.record["running"] = self.name
        self.on_update(self.record)
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.result["seconds"] = round(time.perf_counter() - self._start, 3)
        self._warnings.__exit__(None, None, None)
        messages = []
        for w in self._caught:
            text = str(w.message).strip()
            line = f"{w.category.__name__}: {text.splitlines()[0][:200] if text else ''}"
            if "repq_fx" in w.filename and line not in messages:
                messages.append(line)
        if messages:
            self.result["warnings"] = messages[:5]
        if exc is None:
            self.result["ok"] = True
        else:
            self.result["error"] = error_info(exc)
            self.result["traceback"] = "".join(traceback.format_exception(exc_type, exc, tb))[-4000:]
        self.record["running"] = None
        self.on_update(self.record)
        return exc is None or isinstance(exc, Exception)  # swallow ordinary exceptions, not KeyboardInterrupt


def run_model(spec: str, stages: Sequence[str] = DEFAULT_STAGES, size: int = 64, batch: int = 4,
              calib_batches: int = 3, bn_gain: float = 1.0, seed: int = 0, threads: int = 1,
              example_inputs: bool = False, latency_rounds: int = 10, latency_repeat: int = 10,
              on_update: Callable[[dict[str, Any]], None] = lambda record: None) -> dict[str, Any]:
    """Run ``stages`` on the model ``spec`` names; the record of what each stage did and measured.

    ``on_update(record)`` is called when a stage starts and ends (the subprocess writes the record
    then, so a timeout still says how far the model got). ``example_inputs``: pass the input to
    explain / merge / prepare (a new user calls them without).
    """
    torch.set_num_threads(threads)
    record: dict[str, Any] = {"model": spec, "size": None, "batch": batch, "seed": seed, "bn_gain": bn_gain,
                              "example_inputs": example_inputs, "stages": {}, "running": None}
    state: dict[str, Any] = {}
    torch.manual_seed(seed)
    with Stage(record, "build", on_update):
        model = build_model(spec)
        record["size"] = s = input_size(spec, model, size)
        shape = (batch, 3, s, s)
        calibrate_bn(model, shape, gain=bn_gain, seed=seed)
    if not record["stages"]["build"]["ok"]:
        return _finish(record, stages)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*shape, generator=g)
    calib = [torch.randn(*shape, generator=g) for _ in range(calib_batches)]
    given = (x,) if example_inputs else None

    def ready(stage: str) -> bool:
        missing = [n for n in NEEDS[stage] if not record["stages"].get(n, {}).get("ok")]
        if missing:
            record["stages"][stage] = {"ok": False, "skipped": f"needs {', '.join(missing)}"}
        return not missing

    for stage in stages:
        if not ready(stage):
            continue
        with Stage(record, stage, on_update) as out:
            STAGE_FUNCTIONS[stage](model, x, calib, given, state, out,
                                   latency_rounds=latency_rounds, latency_repeat=latency_repeat, threads=threads)
        if stage == "train" and not out["ok"] and "clean_state" in state:
            state["qmodel"].load_state_dict(state["clean_state"])  # lower the calibrated model instead
            out["note"] = "lower ran on the calibrated model from before the failed step"
    return _finish(record, stages)


def _finish(record: dict[str, Any], stages: Sequence[str]) -> dict[str, Any]:
    reached, failed = None, None
    for stage in ("build", *stages):
        result = record["stages"].get(stage, {})
        if result.get("ok") and failed is None:
            reached = stage
        elif failed is None:
            failed = stage
    record["reached"] = reached
    record["failed"] = failed
    record.pop("running", None)
    return record


def stage_explain(model, x, calib, given, state, out, **_: Any) -> None:
    report = repq_fx.explain(model, given)
    names = [b.name for b in report.blocks]
    out.update(blocks_merged=len(report.merged), blocks=len(report.blocks),
               convs_in_merged=sum(b.num_convs for b in report.merged),
               convs_in_blocks=sum(b.num_convs for b in report.blocks),
               convs_not_merged=sum(b.num_convs for b in report.not_merged),
               left_out=[f"{n}: {r}"[:200] for n, r in report.left_out][:10], left_out_count=len(report.left_out),
               duplicate_block_names=len(names) - len(set(names)), front_end=report.front_end,
               not_merged=[f"{b.name}: {b.reason}"[:200] for b in report.not_merged][:10],
               report_warnings=list(report.warnings)[:5])
    state["report"] = out


def stage_merge(model, x, calib, given, state, out, **_: Any) -> None:
    model64 = copy.deepcopy(model).double().eval()
    x64 = x.double()
    merged = repq_fx.merge(model64, None if given is None else (x64,))
    with torch.no_grad():
        expected, actual = model64(x64), merged(x64)
    if len(tensors(actual)) != len(tensors(expected)):
        raise ZooCheckError(f"merge(model) gives {len(tensors(actual))} output tensors in eval mode, model.eval() "
                            f"{len(tensors(expected))}")
    out["rel_err"] = relative_error(actual, expected)
    out["convs_before"] = count_convs(model64, x64).total
    out["convs_after"] = count_convs(merged, x64).total
    if getattr(model, "pretrained_cfg", None) is not None:  # a timm model: timm's own merge, for scale
        from timm.utils import reparameterize_model

        try:  # timm's merge is context, not a target: its failure is recorded, not the stage's
            timm_merged = reparameterize_model(copy.deepcopy(model64)).eval()
            out["timm_convs_after"] = count_convs(timm_merged, x64).total
            if out["timm_convs_after"] < out["convs_before"]:
                with torch.no_grad():
                    out["timm_rel_err"] = relative_error(timm_merged(x64), expected)
        except Exception as e:  # e.g. a float32 bias in timm's merge of a float64 model (LeViT, RepViT)
            out["timm_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    if not out["rel_err"] <= 1e-9:
        raise ZooCheckError(f"merge differs from model.eval() by {out['rel_err']:.3g} (float64; target 1e-9)")


def stage_exact(model, x, calib, given, state, out, **_: Any) -> None:
    """``prepare`` of the float64 model with fake quant off vs the model, in eval and train mode, before
    and after moving every parameter (the same random step in both): a decision ``prepare`` took
    from a parameter's current value shows up after the move."""
    model64 = copy.deepcopy(model).double()
    x64 = x.double()
    qmodel = repq_fx.prepare(model64, repq_fx.QConfig(), None if given is None else (x64,))
    repq_fx.disable_fake_quant(qmodel)
    errors = {}
    for moved in (False, True):
        if moved:
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for name, p in model64.named_parameters():
                    scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.05
                    step = 0.1 * scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
                    p.add_(step)
                    qmodel.get_parameter(name).add_(step)
        for mode in ("eval", "train"):
            a, b = copy.deepcopy(model64).train(mode == "train"), copy.deepcopy(qmodel).train(mode == "train")
            with torch.no_grad():  # the same seed: dropout draws the same masks in both
                torch.manual_seed(3)
                expected = a(x64)
                torch.manual_seed(3)
                actual = b(x64)
            key = mode + (" moved" if moved else "")
            errors[key] = (relative_error(actual, expected) if len(tensors(actual)) == len(tensors(expected))
                           else float("inf"))
    out["rel_err"] = errors
    bad = {k: v for k, v in errors.items() if not v <= 1e-9}
    if bad:
        raise ZooCheckError("prepare (fake quant off) differs from the model: " +
                            ", ".join(f"{k} {v:.2g}" for k, v in bad.items()) + " (float64; target 1e-9)")


def stage_prepare(model, x, calib, given, state, out, **_: Any) -> None:
    qmodel = repq_fx.prepare(model, repq_fx.QConfig(), given)
    start = time.perf_counter()
    repq_fx.calibrate(qmodel, calib)
    out["calibrate_seconds"] = round(time.perf_counter() - start, 3)
    state["qmodel"] = qmodel
    state["floor"] = floor = steps_at_floor(qmodel)
    out["steps_at_floor"] = len(floor)  # learned steps at the floor (a zero range no longer leaves one there)
    out["at_floor"] = sorted(floor)[:10]


def steps_at_floor(qmodel: nn.Module) -> dict[str, int]:
    """Quantizer name -> how many of its steps are at or below float32 eps (the floor steps are clamped to).

    >>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False)))
    >>> _ = repq_fx.calibrate(q, [torch.randn(1, 3, 4, 4)])
    >>> q.weight_fake_quant.scale.data[:2] = 0   # as an optimizer step larger than the step would leave it
    >>> sorted(steps_at_floor(q).items())
    [('weight_fake_quant', 2)]
    """
    eps = torch.finfo(torch.float32).eps
    names = {id(m): n for n, m in qmodel.named_modules()}
    counts = {}
    for q in fake_quantizers(qmodel):
        scale = getattr(q, "scale", None)
        if isinstance(scale, torch.Tensor) and int((scale.detach() <= eps).sum()):
            counts[names.get(id(q), "?")] = int((scale.detach() <= eps).sum())
    return counts


def stage_train(model, x, calib, given, state, out, **_: Any) -> None:
    qmodel = state["qmodel"]
    state["clean_state"] = copy.deepcopy(qmodel.state_dict())
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
    qmodel.train()
    losses = []
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss = square_loss(qmodel(calib[step % len(calib)]))
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise ZooCheckError(f"the loss is {losses[-1]} at training step {step}")
        loss.backward()
        optimizer.step()
    qmodel.eval()
    out["losses"] = losses
    before = state.get("floor", {})
    pushed = sorted(n for n, k in steps_at_floor(qmodel).items() if k > before.get(n, 0))
    out["pushed_to_floor"] = len(pushed)  # steps that training moved to the floor
    out["pushed"] = pushed[:10]


def stage_lower(model, x, calib, given, state, out, **_: Any) -> None:
    qmodel = state["qmodel"].eval()
    lowered = repq_fx.lower(qmodel)
    with torch.no_grad():
        expected, actual, original = qmodel(x), lowered(x), model(x)
    if len(tensors(expected)) == len(tensors(original)):
        out["qmodel_vs_float"] = relative_error(expected, original)
    else:  # a target missed (prepare must equal the model in eval mode), but lowering can still be measured
        out["output_tensors"] = [len(tensors(expected)), len(tensors(original))]
    out["distinct_outputs"] = len(torch.cat([t.flatten() for t in tensors(expected)]).unique())
    steps = output_steps(lowered)
    calls = count_convs(lowered, x)
    out["quantized_convs"] = calls.quantized_modules
    out["float_convs"] = calls.float_convs
    out["explain_not_merged_convs"] = (state.get("report") or {}).get("convs_not_merged")
    if steps:
        diffs = in_steps(actual, expected, steps)
        out["max_steps"] = max(float(d.max()) for d in diffs)
        out["output_step"] = steps[0]
    out["argmax"] = argmax_agreement(actual, expected)
    out["layer_max_steps"], out["layer_worst"], out["layer_share_off"] = layer_steps(qmodel, lowered, x)
    state["lowered"], state["lowered_out"], state["steps"] = lowered, actual, steps
    state["quantized_convs"] = calls.quantized_modules


def stage_export(model, x, calib, given, state, out, threads: int = 1, **_: Any) -> None:
    lowered = state["lowered"]
    workdir = state.setdefault("workdir", tempfile.mkdtemp(prefix="repq_zoo_"))
    path = os.path.join(workdir, "int8.onnx")
    start = time.perf_counter()
    repq_fx.export_onnx(lowered, (x[:1],), path)
    out["export_seconds"] = round(time.perf_counter() - start, 3)  # the rest of the stage is checking
    state["int8_path"] = path
    ops = optimized_ops(path)
    out["ops"] = {k: v for k, v in sorted(ops.items()) if k in INT8_CONV_OPS + FLOAT_CONV_OPS + (
        "QGemm", "Gemm", "MatMul", "MatMulInteger", "QLinearMatMul")}
    calls = count_convs(lowered, x[:1])
    out.update(int8_conv_check(ops, calls.quantized_modules, calls.float_convs))
    # end to end (repq_fx.export.parity): chaos of a random network can grow one-step ties; reported
    parity = onnx_runtime_parity(path, lowered, (x,), threads)
    out["ort_within_one_step"], out["ort_max_steps"] = parity.within_one_step, parity.max_steps
    # the same file with ORT's graph optimisations off: QDQ runs as float ops, no int8 kernel
    plain = unoptimized_session(path, threads)
    plain_out = [torch.from_numpy(o) for o in plain.run(None, {plain.get_inputs()[0].name: x.numpy()})]
    lowered_out = tensors(state["lowered_out"])
    if len(plain_out) != len(lowered_out):
        raise ZooCheckError(f"ONNX Runtime gives {len(plain_out)} outputs, the lowered model {len(lowered_out)}")
    steps = [s or 1.0 for s in parity_output_steps(lowered)] or [float("nan")]
    diffs = torch.cat(in_steps(plain_out, lowered_out, steps))
    out["ort_unoptimized_within_one_step"] = float((diffs <= WITHIN).double().mean())
    try:  # layer by layer: a diagnostic; if it cannot cut the file, that is recorded, not the stage's failure
        out.update(summarize_segments(segment_parity(path, lowered, (x,), threads)))
    except Exception as e:
        out["ort_layer_error"] = error_info(e)


INT8_CONV_OPS = ("QLinearConv", "ConvInteger")  # what ORT runs an int8 conv as
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NhwcFusedConv")


def int8_conv_check(ops: dict[str, int], int8_convs: int, float_convs: int = 0) -> dict[str, Any]:
    """ORT's optimized graph must run one int8 conv per ``QuantizedConv2d`` call of the lowered
    model, and no float conv beyond those the lowered model itself runs in float (convs ``explain``
    lists as left out, e.g. inside a module torch.fx cannot trace).

    >>> int8_conv_check({"QLinearConv": 3, "Conv": 1}, 4)
    {'ort_int8_convs': 3, 'ort_float_convs': 1, 'qlinearconv_expected': 4, 'lowered_float_convs': 0, 'ops_ok': False}
    >>> int8_conv_check({"QLinearConv": 4, "Conv": 1}, 4, float_convs=1)["ops_ok"]
    True
    """
    int8 = sum(ops.get(k, 0) for k in INT8_CONV_OPS)
    floats = sum(ops.get(k, 0) for k in FLOAT_CONV_OPS)
    return {"ort_int8_convs": int8, "ort_float_convs": floats, "qlinearconv_expected": int8_convs,
            "lowered_float_convs": float_convs, "ops_ok": int8 == int8_convs and floats <= float_convs}


def summarize_segments(segments: Sequence[Any]) -> dict[str, Any]:
    """The zoo's record of :func:`repq_fx.export.parity.segment_parity`: segments run, those not ``ok``
    (first ten, as text), the worst segment's max steps and name, the lowest share within one step.

    >>> from repq_fx.export.parity import SegmentParity
    >>> r = summarize_segments([SegmentParity("a", ("conv",), 1.0, 1.0), SegmentParity("b", ("c2",), 0.9, 3.0)])
    >>> r["ort_layers"], r["ort_layers_bad"], r["ort_layer_max_steps"], r["ort_layer_worst"]
    (2, 1, 3.0, 'b')
    """
    bad = [s for s in segments if not s.ok]
    worst = max(segments, key=lambda s: s.max_steps, default=None)
    return {"ort_layers": len(segments), "ort_layers_bad": len(bad),
            "ort_layers_bad_list": [str(s)[:200] for s in bad[:10]],
            "ort_layer_max_steps": worst.max_steps if worst else 0.0,
            "ort_layer_worst": worst.output if worst else "",
            "ort_layer_min_within": min((s.within_one_step for s in segments), default=1.0)}


def _session_options(threads: int, optimized: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def unoptimized_session(path: str, threads: int = 1):
    """An ONNX Runtime CPU session of ``path`` with every graph optimisation off (no QLinearConv fusion)."""
    import onnxruntime as ort

    return ort.InferenceSession(path, _session_options(threads, optimized=False), providers=["CPUExecutionProvider"])


def stage_latency(model, x, calib, given, state, out, latency_rounds: int = 10, latency_repeat: int = 10,
                  threads: int = 1, **_: Any) -> None:
    float_path = os.path.join(state["workdir"], "float.onnx")
    export_float(repq_fx.merge(model), (x[:1],), float_path)
    feeds = {"input": x[:1].numpy()}
    sessions = {"int8": session(state["int8_path"], threads), "float": session(float_path, threads)}
    runners = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feeds["input"]}))
               for name, s in sessions.items()}
    times = round_robin(runners, latency_rounds, warmup=5, repeat=latency_repeat)
    out["int8_ms"] = statistics.median(times["int8"]) * 1e3
    out["float_ms"] = statistics.median(times["float"]) * 1e3
    out["speedup"] = out["float_ms"] / out["int8_ms"]


STAGE_FUNCTIONS: dict[str, Callable[..., None]] = {
    "explain": stage_explain, "merge": stage_merge, "exact": stage_exact, "prepare": stage_prepare,
    "train": stage_train, "lower": stage_lower, "export": stage_export, "latency": stage_latency,
}


# ---------------------------------------------------------------------------
# One subprocess per model
# ---------------------------------------------------------------------------

def run_isolated(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_model` in a fresh interpreter with ``args.timeout`` seconds; a timeout or a crash
    becomes the error of the stage that was running."""
    with tempfile.TemporaryDirectory(prefix="repq_zoo_") as tmp:
        path = os.path.join(tmp, "record.json")
        command = [sys.executable, os.path.abspath(__file__), "--child", path, "--models", spec,
                   "--stages", *args.stages, *_shared_flags(args)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
            problem = None if proc.returncode == 0 else (
                "ChildCrash", f"the subprocess exited with code {proc.returncode}: "
                f"{(proc.stderr.strip().splitlines() or [''])[-1][:300]}")
        except subprocess.TimeoutExpired:
            problem = ("Timeout", f"the model took more than --timeout {args.timeout} s")
        record = _read(path) or {"model": spec, "stages": {}, "running": "build"}
        record["wall_seconds"] = round(time.perf_counter() - start, 1)
        if problem is not None:
            # the stage that was running, or the first one that never ran (a crash between stages)
            stage = record.get("running") or next((s for s in args.stages if s not in record["stages"]), "build")
            elapsed = record["wall_seconds"] - sum(r.get("seconds") or 0 for r in record["stages"].values())
            record["stages"][stage] = {"ok": False, "seconds": round(elapsed, 1),
                                       "error": {"type": problem[0], "message": problem[1], "frame": ""}}
            record["running"] = stage
        if "reached" not in record or record.get("running"):
            _finish(record, args.stages)
        return record


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write(path: str, record: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, default=str)
    os.replace(tmp, path)


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--size", str(args.size), "--batch", str(args.batch), "--bn-gain", str(args.bn_gain),
             "--seed", str(args.seed), "--threads", str(args.threads), "--latency-rounds", str(args.latency_rounds),
             "--latency-repeat", str(args.latency_repeat)]
    return flags + (["--example-inputs"] if args.example_inputs else [])


def environment() -> dict[str, Any]:
    """Versions and the CPU features ONNX Runtime's int8 kernels depend on."""
    import onnxruntime
    import timm
    import torchvision

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    features = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "onnxruntime": onnxruntime.__version__, "machine": platform.machine(), "cpu_features": features,
            "date": time.strftime("%Y-%m-%d")}


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

def _fmt_error(result: dict[str, Any], width: int = 90) -> str:
    e = result.get("error")
    if not e:
        return ""
    text = f"{e['type']}: {e['message']}"
    text = text if len(text) <= width else text[: width - 3] + "..."
    return text.replace("|", "\\|")


def _cell(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    if result.get("skipped"):
        return "skip"
    seconds = result.get("seconds")
    t = "?" if seconds is None else f"{seconds:.1f}"
    return t if result.get("ok") else f"FAIL {t}"


def ort_convs_ok(export: dict[str, Any], lower: dict[str, Any]) -> bool:
    """:func:`int8_conv_check`'s verdict from a record's counts (records written before the lowered
    model's float convs were stored in the export stage take them from the lower stage)."""
    floats = export.get("lowered_float_convs", lower.get("float_convs", 0))
    return export["ort_int8_convs"] == export["qlinearconv_expected"] and export["ort_float_convs"] <= floats


def checks(record: dict[str, Any]) -> list[str]:
    """The targets of issues 12 and 13 that a record misses (a stage that crashed is not repeated here).

    >>> checks({"stages": {"export": {"ok": True, "ort_within_one_step": 0.5, "ort_max_steps": 9,
    ...                                 "ops_ok": False, "ort_int8_convs": 3, "qlinearconv_expected": 4,
    ...                                 "ort_float_convs": 1, "ort_layers": 9, "ort_layers_bad": 2,
    ...                                 "ort_layer_max_steps": 7, "ort_layer_worst": "relu_q"}}})
    ... # doctest: +NORMALIZE_WHITESPACE
    ['ORT graph: 3 int8 convs (QLinearConv/ConvInteger) for 4 lowered int8 convs, 1 float Conv
      (lowered runs 0 in float)',
     'ORT 50.00 % within 1 step', 'ORT: 2 of 9 layers off (worst 7 steps, relu_q)']
    """
    st = record["stages"]
    ex, me, tr, lo, xp = (st.get(k, {}) for k in ("explain", "merge", "train", "lower", "export"))
    missed = []
    if ex.get("duplicate_block_names"):
        missed.append(f"{ex['duplicate_block_names']} duplicate block names")
    if me.get("timm_convs_after") is not None and me["convs_after"] > me["timm_convs_after"]:
        missed.append(f"merge leaves {me['convs_after']} convs, timm's reparameterize_model {me['timm_convs_after']}")
    if ex.get("ok") and me.get("convs_before") is not None:
        unlisted = me["convs_before"] - ex["convs_in_blocks"] - ex["left_out_count"]
        if unlisted > 0:
            missed.append(f"explain misses {unlisted} of {me['convs_before']} convs")
    pr = st.get("prepare", {})
    if pr.get("steps_at_floor"):
        missed.append(f"{pr['steps_at_floor']} quantizers calibrated to the eps step (zero range)")
    if tr.get("pushed_to_floor"):
        missed.append(f"{tr['pushed_to_floor']} steps pushed to the eps floor by training")
    if lo.get("output_tensors"):
        missed.append(f"qmodel.eval() gives {lo['output_tensors'][0]} output tensors, model.eval() "
                      f"{lo['output_tensors'][1]}")
    if lo.get("distinct_outputs") == 1:
        missed.append("the fake-quant output is constant (the comparisons after it are vacuous)")
    if "max_steps" in lo and lo["max_steps"] > WITHIN:
        missed.append(f"lowered vs qmodel {lo['max_steps']:.0f} steps")
    if lo.get("argmax") and lo["argmax"][0] != lo["argmax"][1]:
        missed.append(f"argmax {lo['argmax'][0]}/{lo['argmax'][1]}")
    if lo.get("layer_max_steps", 0) > WITHIN:
        missed.append(f"a layer {lo['layer_max_steps']:.0f} steps off ({lo['layer_worst']})")
    listed = (lo.get("explain_not_merged_convs") or 0) + (ex.get("left_out_count") or 0)
    if "float_convs" in lo and lo["float_convs"] > listed:
        missed.append(f"{lo['float_convs']} float convs after lower, explain lists {listed} (not merged or left out)")
    if "ort_int8_convs" in xp and not ort_convs_ok(xp, lo):
        missed.append(f"ORT graph: {xp['ort_int8_convs']} int8 convs (QLinearConv/ConvInteger) for "
                      f"{xp['qlinearconv_expected']} lowered int8 convs, {xp['ort_float_convs']} float Conv "
                      f"(lowered runs {xp.get('lowered_float_convs', 0)} in float)")
    if "ort_within_one_step" in xp and xp["ort_within_one_step"] < 0.999:
        missed.append(f"ORT {100 * xp['ort_within_one_step']:.2f} % within 1 step")
    if xp.get("ort_layers_bad"):
        missed.append(f"ORT: {xp['ort_layers_bad']} of {xp['ort_layers']} layers off "
                      f"(worst {xp['ort_layer_max_steps']:.0f} steps, {xp['ort_layer_worst']})")
    if xp.get("ort_layer_error"):
        missed.append(f"ORT per layer failed: {xp['ort_layer_error']['type']}")
    return missed


def table(records: Iterable[dict[str, Any]], stages: Sequence[str] = STAGES) -> str:
    """The markdown table of zoo records, then every failure with its deepest repq_fx frame.

    Columns: the first stage that failed and its error; seconds per stage (``FAIL`` where it raised,
    ``skip`` where a stage it needs failed); blocks merged / total and convs in them -> after;
    merge's float64 relative error (and timm's ``reparameterize_model``'s, for timm models); the
    fake-quant model vs the float model (relative error: how far quantization moves this random
    network); lowered vs ``qmodel.eval()`` end to end (max output steps, argmax agreement) and per
    layer on identical inputs (max steps, share more than half a step off); float convs run by the
    lowered model (convs explain lists as not merged or left out); ONNX Runtime vs lowered (share within one
    output step, max; and with ORT's graph optimisations off, where the QDQ graph runs as float ops
    and no int8 kernel); ORT per layer (``repq_fx.export.parity.segment_parity``: segments not ok /
    segments, max steps, lowest share within one step); int8 convs in ORT's optimized graph
    (``QLinearConv`` + ``ConvInteger``) / ``QuantizedConv2d`` calls of the lowered model, and float
    convs left in it; the targets missed.
    """
    records = list(records)
    shown = [s for s in stages if any(s in r["stages"] for r in records)]
    head = ["model", "input", "reached", "first error", *[f"{s} s" for s in shown], "explain merged",
            "merge rel err", *(["prepare fq off rel err"] if "exact" in shown else []), "fake quant vs float",
            "lowered vs qmodel", "per layer", "float convs (explain)",
            "ORT within 1 step", "ORT per layer", "ORT int8 convs / lowered"]
    if "latency" in shown:
        head.append("ORT ms int8 / float")
    head.append("targets missed")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    failures = []
    for r in records:
        st = r["stages"]
        first = st.get(r.get("failed") or "", {})
        ex, me, lo, xp, la = (st.get(k, {}) for k in ("explain", "merge", "lower", "export", "latency"))
        if first.get("error"):
            error = f"{r['failed']}: {_fmt_error(first)}"
        else:
            error = f"{r['failed']}: {first['skipped']}" if first.get("skipped") else ""
        row = [r["model"], str(r.get("size") or ""), r.get("reached") or "-", error,
               *[_cell(st.get(s)) for s in shown]]
        row.append(f"{ex['blocks_merged']}/{ex['blocks']}, {ex['convs_in_merged']}->{ex['blocks_merged']}"
                   if ex.get("ok") else "")
        cell = f"{me['rel_err']:.1e}" if "rel_err" in me else ""
        row.append(cell + (f" (timm {me['timm_rel_err']:.1e})" if "timm_rel_err" in me else ""))
        if "exact" in shown:
            errs = st.get("exact", {}).get("rel_err", {})
            row.append(", ".join(f"{k} {v:.0e}" for k, v in errs.items()))
        row.append(f"{lo['qmodel_vs_float']:.2f}" if "qmodel_vs_float" in lo else "")
        cell = f"{lo['max_steps']:.0f} steps" if "max_steps" in lo else ""
        if lo.get("argmax"):
            cell += f", argmax {lo['argmax'][0]}/{lo['argmax'][1]}"
        row.append(cell)
        row.append(f"{lo['layer_max_steps']:.0f}, {100 * lo['layer_share_off']:.2f} %" if "layer_max_steps" in lo
                   else "")
        listed = (lo.get("explain_not_merged_convs") or 0) + (ex.get("left_out_count") or 0)
        row.append(f"{lo['float_convs']} ({listed})" if "float_convs" in lo else "")
        cell = (f"{100 * xp['ort_within_one_step']:.2f} % ({xp['ort_max_steps']:.0f})"
                if "ort_within_one_step" in xp else "")
        if "ort_unoptimized_within_one_step" in xp:
            cell += f"; unoptimized {100 * xp['ort_unoptimized_within_one_step']:.2f} %"
        row.append(cell)
        if "ort_layers" in xp:
            row.append(f"{xp['ort_layers_bad']}/{xp['ort_layers']} off, max {xp['ort_layer_max_steps']:.0f}, "
                       f"min {100 * xp['ort_layer_min_within']:.2f} %")
        else:
            row.append(_fmt_error({"error": xp["ort_layer_error"]}, 60) if xp.get("ort_layer_error") else "")
        if "ops" in xp:
            row.append(("ok" if ort_convs_ok(xp, lo) else "BAD")
                       + f" {xp['ort_int8_convs']}/{xp['qlinearconv_expected']}, {xp['ort_float_convs']} float")
        else:
            row.append("")
        if "latency" in shown:
            row.append(f"{la['int8_ms']:.2f} / {la['float_ms']:.2f} ({la['speedup']:.2f}x)" if la.get("ok") else "")
        row.append("; ".join(checks(r)).replace("|", "\\|"))
        lines.append("| " + " | ".join(row) + " |")
        for stage, result in st.items():
            if result.get("error"):
                e = result["error"]
                failures.append(f"- {r['model']}, {stage}: {e['type']}: {e['message']}"
                                + (f" ({e['frame']})" if e.get("frame") else ""))
    if failures:
        lines += ["", "Failures (every stage that raised; the deepest repq_fx frame in parentheses):", *failures]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS, help="model specs (default: the issue-12 list)")
    p.add_argument("--stages", nargs="+", default=None, choices=STAGES,
                   help=f"stages to run, in order (default: {' '.join(DEFAULT_STAGES)})")
    p.add_argument("--latency", action="store_true", help="add the latency stage")
    p.add_argument("--exact", action="store_true",
                   help="add the exact stage (float64 prepare, fake quant off, vs the model; train and eval)")
    p.add_argument("--size", type=int, default=64, help="square input size (default 64)")
    p.add_argument("--batch", type=int, default=4, help="batch size of every input (default 4)")
    p.add_argument("--bn-gain", type=float, default=1.0, help="BN weights times this after calibration (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default 1)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per model (default 1200)")
    p.add_argument("--example-inputs", action="store_true", help="pass the input to explain/merge/prepare")
    p.add_argument("--latency-rounds", type=int, default=10)
    p.add_argument("--latency-repeat", type=int, default=10)
    p.add_argument("--json", metavar="FILE", help="append one JSON record per model to FILE")
    p.add_argument("--markdown", metavar="FILE", nargs="?", const="-",
                   help="append the markdown table to FILE too (it is always printed)")
    p.add_argument("--from-json", metavar="FILE", help="print the table of the records in FILE; run nothing")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (no --timeout): for debugging")
    p.add_argument("--child", metavar="RECORD", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.stages = list(args.stages or DEFAULT_STAGES)
    args.stages += [s for s in ("latency", "exact") if getattr(args, s) and s not in args.stages]
    args.stages = [s for s in STAGES if s in args.stages]  # always in pipeline order
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    options = dict(stages=args.stages, size=args.size, batch=args.batch, bn_gain=args.bn_gain, seed=args.seed,
                   threads=args.threads, example_inputs=args.example_inputs, latency_rounds=args.latency_rounds,
                   latency_repeat=args.latency_repeat)
    if args.child:
        run_model(args.models[0], on_update=lambda record: _write(args.child, record), **options)
        return
    if args.from_json:
        with open(args.from_json) as f:
            records = [json.loads(line) for line in f if line.strip()]
        _output(table(records), args)
        return
    from tqdm import tqdm

    env = environment()
    records = []
    bar = tqdm(args.models, desc="zoo", unit="model", file=sys.stderr, dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(spec)
        if args.in_process:
            record = run_model(spec, **options)
        else:
            record = run_isolated(spec, args)
        record["env"] = env
        records.append(record)
        failed = record.get("failed")
        result = record["stages"].get(failed, {})
        why = f", {failed}: {_fmt_error(result, 200) or result.get('skipped', '')}" if failed else ""
        bar.write(f"{spec}: reached {record.get('reached')}{why}", file=sys.stderr)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({k: v for k, v in record.items()}, default=str) + "\n")
    header = (f"zoo {env['date']}: torch {env['torch']}, torchvision {env['torchvision']}, timm {env['timm']}, "
              f"onnxruntime {env['onnxruntime']}, {env['machine']} ({', '.join(env['cpu_features']) or 'no AVX2'}); "
              f"input {args.batch}x3x{args.size}x{args.size} unless noted, BN gain {args.bn_gain}, "
              f"{args.threads} thread(s)\n\n")
    _output(header + table(records, args.stages), args)


def _output(text: str, args: argparse.Namespace) -> None:
    print(text)
    if args.markdown and args.markdown != "-":
        with open(args.markdown, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
