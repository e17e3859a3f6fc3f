"""Does the runtime compute what the lowered model computes? ONNX Runtime against ``lower``'s output.

The lowered model and ONNX Runtime work on the same integer grid, so their outputs may differ only
where a float rounding puts a value on the other side of a requantization boundary: by one output
step, on a tiny fraction of outputs. :func:`check_onnx_runtime` runs the file and fails when more
than 0.1 % of outputs are further apart than that, naming what on this CPU explains it.

>>> import tempfile, os, torch, torch.nn as nn, repq_fx
>>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
>>> _ = repq_fx.calibrate(q, [torch.randn(4, 3, 8, 8)])
>>> lowered = repq_fx.lower(q)
>>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
>>> _ = repq_fx.export_onnx(lowered, (torch.randn(1, 3, 8, 8),), path)
>>> check_onnx_runtime(path, lowered, (torch.randn(4, 3, 8, 8),)).ok
True
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves, tree_map

from ..errors import ExportCheckError, first_few
from ..quant.lowered import QuantizeDequantize
from .saturation import int16_pair_overflows

AGREEMENT = 0.999  # the fraction of outputs that must be within one output step


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime's outputs against the lowered model's, in output quantization steps."""

    within_one_step: float  # fraction of output values at most one step apart
    max_steps: float  # the largest difference, in steps
    values: int  # output values compared
    ops: collections.Counter = field(default_factory=collections.Counter)  # ops of ORT's optimized graph

    @property
    def ok(self) -> bool:
        return self.within_one_step >= AGREEMENT

    def __str__(self) -> str:
        return (f"{100 * self.within_one_step:.2f} % of {self.values} outputs within one step (max "
                f"{self.max_steps:.1f} steps); ORT runs {self.ops.get('QLinearConv', 0)} QLinearConv, "
                f"{self.ops.get('QGemm', 0)} QGemm, {self.ops.get('Conv', 0) + self.ops.get('FusedConv', 0)} float Conv")


def output_steps(lowered: fx.GraphModule) -> list[float | None]:
    """The quantization step of each output of ``lowered`` (flattened): the largest step of the quantizers
    it is computed from behind the last integer layer; None for an output no quantizer reaches."""
    output = next(n for n in lowered.graph.nodes if n.op == "output")
    steps = []
    for leaf in tree_leaves(output.args[0]):
        if not isinstance(leaf, fx.Node):
            steps.append(None)
            continue
        modules = (lowered.get_submodule(n.target) for n in _upstream(leaf, lambda n: (
            [] if _is_quantizer(lowered, n) else n.all_input_nodes)) if n.op == "call_module")
        found = [float(m.scale) for m in modules if isinstance(m, QuantizeDequantize)]
        steps.append(max(found) if found else None)
    return steps


def _upstream(start: fx.Node, inputs_of: Callable[[fx.Node], list[fx.Node]]) -> Iterator[fx.Node]:
    """``start`` and the nodes it is computed from, each once, reached through ``inputs_of`` (empty: stop)."""
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            yield n
            stack.extend(inputs_of(n))


def _is_quantizer(gm: fx.GraphModule, n: fx.Node) -> bool:
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantizeDequantize)


def onnx_runtime_parity(path: str, lowered: fx.GraphModule, inputs: Sequence[torch.Tensor],
                        threads: int = 1) -> Parity:
    """Run ``path`` in ONNX Runtime (CPU) on ``inputs`` and compare with ``lowered`` (see :class:`Parity`)."""
    from .runtime import optimized_ops, session

    inputs = tuple(inputs)
    sess = session(path, threads)
    feed = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), inputs)}
    actual = sess.run(None, feed)
    within, worst, compared = step_agreement(actual, lowered, inputs)
    return Parity(within, worst, compared, optimized_ops(path))


def step_agreement(actual: Sequence[Any], lowered: fx.GraphModule,
                   inputs: Sequence[torch.Tensor]) -> tuple[float, float, int]:
    """Any runtime's flattened outputs ``actual`` (arrays or tensors) on ``inputs`` against ``lowered``'s, in
    output quantization steps: ``(fraction within one step, largest difference in steps, values compared)``.

    >>> import torch.nn as nn, repq_fx
    >>> q = repq_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> _ = repq_fx.calibrate(q, [torch.randn(4, 3, 8, 8)])
    >>> lowered, x = repq_fx.lower(q), torch.randn(2, 3, 8, 8)
    >>> step_agreement([lowered(x)], lowered, (x,))
    (1.0, 0.0, 576)
    """
    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in tree_leaves(lowered.eval()(*inputs))]
    return steps_apart(actual, expected, output_steps(lowered))


def steps_apart(actual: Sequence[Any], expected: Sequence[Any], steps: Sequence[float | None]
                ) -> tuple[float, float, int]:
    """Flattened outputs ``actual`` against ``expected`` (arrays or tensors), each in its quantization step
    (None: 1e-5 of its largest value): ``(fraction within one step, largest difference in steps, values
    compared)``.

    >>> steps_apart([np.array([0.0, 0.5, 3.0])], [np.zeros(3)], [1.0])
    (0.6666666666666666, 3.0, 3)
    """
    within = compared = 0
    worst = 0.0
    for got, ref, step in zip(actual, expected, steps):
        got, ref = (np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t) for t in (got, ref))
        scale = step if step else max(float(np.abs(ref).max()), 1.0) * 1e-5
        distance = np.abs(got.astype(np.float64).reshape(ref.shape) - ref.astype(np.float64)) / scale
        within += int((distance <= 1.001).sum())
        compared += distance.size
        worst = max(worst, float(distance.max()) if distance.size else 0.0)
    return within / max(compared, 1), worst, compared


def cpu_int8_features(flags: Sequence[str] | None = None, machine: str | None = None) -> str:
    """What this CPU (or one with these x86 ``flags``) offers ONNX Runtime's int8 kernels, in words.

    >>> cpu_int8_features(["sse4_2", "avx2", "fma"], "x86_64")[:40]
    'an x86 CPU with AVX2 but no VNNI (no avx'
    >>> cpu_int8_features(["avx2", "avx512bw", "avx512_vnni"], "x86_64")
    'an x86 CPU with AVX512-VNNI'
    """
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return f"a non-x86 CPU ({machine})"
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            return "an x86 CPU (its features could not be read)"
    vnni = [f for f in ("avx512_vnni", "avx_vnni") if f in flags]
    if vnni:
        return f"an x86 CPU with {' and '.join(v.upper().replace('_', '-') for v in vnni)}"
    widest = "AVX512" if "avx512bw" in flags else "AVX2" if "avx2" in flags else "SSE"
    return (f"an x86 CPU with {widest} but no VNNI (no avx512_vnni or avx_vnni flag), where ONNX Runtime's u8s8 "
            "kernels add pairs of products in 16 bits and saturate")


@dataclass(frozen=True)
class SegmentParity:
    """One stretch of the lowered graph between quantizers, run alone in ONNX Runtime on the lowered model's
    own inputs to it (so differences upstream cannot reach it)."""

    output: str  # the FX node name of the quantizer that ends the segment
    layers: tuple[str, ...]  # the integer layers inside it (module paths)
    within_one_step: float
    max_steps: float

    @property
    def ok(self) -> bool:
        """99.9 % within one step; and, where an integer layer ends in this quantizer, none further: one
        rounding step is all a float tie can move an integer result."""
        return self.within_one_step >= AGREEMENT and (not self.layers or self.max_steps <= 1.001)

    def __str__(self) -> str:
        what = ", ".join(self.layers) or self.output
        return f"{what}: {100 * self.within_one_step:.2f} % within one step (max {self.max_steps:.1f})"


def _segment(gm: fx.GraphModule, end: fx.Node, names: dict) -> tuple[list[tuple[fx.Node, str]], list[str]]:
    """Where the segment that ends in quantizer ``end`` starts, as ``(FX node holding the value, ONNX tensor)``
    pairs (the inputs of its nearest upstream quantizers, and model inputs it reads directly), and the
    integer layers inside it."""
    from ..quant.lowered import QuantizedConv2d, QuantizedLinear

    def inputs_of(n: fx.Node) -> list[fx.Node]:
        if n is end:
            return n.all_input_nodes[:1]
        return [] if _is_quantizer(gm, n) or n.op == "placeholder" else n.all_input_nodes

    starts: list[tuple[fx.Node, str]] = []
    layers: list[str] = []
    for n in _upstream(end, inputs_of):
        if n is not end and _is_quantizer(gm, n):
            starts.append((n.args[0], names["quantizers"][n.target][0]))
        elif n.op == "placeholder":
            starts.append((n, names["inputs"][n.name]))
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), (QuantizedConv2d, QuantizedLinear)):
            layers.append(n.target)
    return starts, sorted(layers)


def _snapshot_values(lowered: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[fx.Node, Any]:
    """Every node's value as it was computed: a copy, because an in-place op later in the graph
    (``ReLU6(inplace=True)`` after a quantized conv) overwrites the tensor the interpreter holds."""

    class Snapshot(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            snapshot[n] = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, out)
            return out

    snapshot: dict[fx.Node, Any] = {}
    with torch.no_grad():
        Snapshot(lowered.eval()).run(*inputs)
    return snapshot


def segment_parity(path: str, lowered: fx.GraphModule, inputs: Sequence[torch.Tensor],
                   threads: int = 1, run: Callable[[bytes, dict], np.ndarray] | None = None) -> list[SegmentParity]:
    """Every quantizer of ``lowered`` and what computes its input since the previous quantizers, cut out of
    the exported file (``onnx.utils.Extractor``) and run in ONNX Runtime on the lowered model's own values:
    each layer's agreement, free of the amplification of rounding ties through a deep network.
    ``run(serialized ONNX model, feed)`` runs a segment in another runtime (default: ONNX Runtime, ``threads``)."""
    import onnx
    from onnx.utils import Extractor

    from .onnx_qdq import TENSOR_NAMES
    from .runtime import session

    model = onnx.load(path)
    props = {p.key: p.value for p in model.metadata_props}
    if TENSOR_NAMES not in props:
        raise ExportCheckError(f"{path} was not written by repq_fx.export_onnx (no {TENSOR_NAMES} metadata); "
                               "compare it end to end with onnx_runtime_parity instead")
    names = json.loads(props[TENSOR_NAMES])
    values = _snapshot_values(lowered, inputs)
    extractor = Extractor(onnx.shape_inference.infer_shapes(model))  # value infos of every tensor
    model_inputs = [(n, names["inputs"][n.name]) for n in lowered.graph.nodes
                    if n.op == "placeholder" and n.name in names["inputs"]]
    results = []
    for node in lowered.graph.nodes:
        if node.op != "call_module" or node.target not in names["quantizers"]:
            continue
        starts, layers = _segment(lowered, node, names)
        feed = {name: values[n].detach().cpu().numpy() for n, name in starts}
        # every model input too: torch.onnx may read its shape anywhere (a dynamic batch for a reshape)
        feed.update({name: values[n].detach().cpu().numpy() for n, name in model_inputs if name not in feed})
        sub = extractor.extract_model(list(feed), [names["quantizers"][node.target][1]])
        needed = {i.name for i in sub.graph.input}
        feed = {k: v for k, v in feed.items() if k in needed}
        if run is None:
            (got,) = session(sub.SerializeToString(), threads).run(None, feed)
        else:
            got = run(sub.SerializeToString(), feed)
        ref = values[node].detach().cpu().numpy()
        step = float(lowered.get_submodule(node.target).scale)
        steps = np.abs(got.astype(np.float64) - ref.astype(np.float64)) / step
        within = float((steps <= 1.001).mean()) if steps.size else 1.0
        results.append(SegmentParity(node.target, tuple(layers), within, float(steps.max()) if steps.size else 0.0))
    return results


def check_onnx_runtime(path: str, lowered: fx.GraphModule, inputs: Sequence[Any], threads: int = 1) -> Parity:
    """ONNX Runtime against ``lowered`` on ``inputs``, layer by layer (:func:`segment_parity`): raises
    :class:`~repq_fx.errors.ExportCheckError` when a layer has fewer than 99.9 % of its outputs within
    one step, naming the layers, what this CPU lacks and which layers can overflow its kernels.
    Returns the end-to-end :class:`Parity` (which rounding ties amplified through a deep random network
    can push below 99.9 % without any layer being wrong: it is reported, not checked)."""
    inputs = tuple(inputs)
    bad = [s for s in segment_parity(path, lowered, inputs, threads) if not s.ok]
    parity = onnx_runtime_parity(path, lowered, inputs, threads)
    if not bad:
        return parity
    overflows = int16_pair_overflows(lowered)
    cause = (f"{len(overflows)} layers can overflow 16-bit pair sums (first: {overflows[0]})" if overflows
             else "no layer can overflow 16-bit pair sums, so this is a bug in repq_fx's export: please report it")
    listed = first_few(bad)
    raise ExportCheckError(f"ONNX Runtime disagrees with the lowered model in {len(bad)} layers ({listed}); end to "
                           f"end: {parity}. This machine is {cpu_int8_features()}; {cause}")


__all__ = ["Parity", "SegmentParity", "AGREEMENT", "output_steps", "step_agreement", "steps_apart",
           "onnx_runtime_parity", "segment_parity", "cpu_int8_features", "check_onnx_runtime"]
