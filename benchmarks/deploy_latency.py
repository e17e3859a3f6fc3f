"""Deployment latency of timm repvgg_a0 on ONNX Runtime (CPU): repq_fx int8 per target vs ORT's own PTQ vs float.

Every ONNX file comes from one ``timm.create_model(name, pretrained=False)`` whose BN running
statistics are set from calibration images:

- ``ort float``: timm's ``reparameterize_model`` (one conv per block), exported with
  ``torch.onnx.export`` (float32);
- ``repq_fx <target>``: ``prepare(QConfig(target=...))`` -> ``calibrate`` (same images) -> ``lower``
  -> ``export_onnx``, once per deployment target (:mod:`repq_fx.targets`);
- ``quantize_static <setting>``: ONNX Runtime's own post-training quantization of the float file
  (after ``quant_pre_process``; QDQ format, per-channel weights, calibrated on the same images),
  with each data-type setting ONNX Runtime documents for CPUs (:data:`QUANTIZE_STATIC`): the one it
  recommends for x86 without VNNI (uint8 activations, int8 weights, ``reduce_range=True``), U8U8
  (its other remedy for that CPU), U8S8 full range (its recommendation for VNNI CPUs) and S8S8 (its
  default data types).

Exactness on *this* CPU, layer by layer: each int8 file is cut into the stretches between its
quantizers, each run alone in ONNX Runtime (all optimisations: the fused int8 kernels) on the
reference values of its inputs. The reference of a repq_fx file is the lowered PyTorch model
(``repq_fx.export.parity.segment_parity``); that of a ``quantize_static`` file is the same file run
by ONNX Runtime with graph optimisations off (each QDQ node as the ONNX spec defines it, float
convolutions: no int8 kernel). A layer computed exactly is within one output step on every value (a
float tie may round the other way); saturating 16-bit pair sums put values many steps off.

Two more sessions run full-range files (``repq_fx onnxruntime-vnni``, ``quantize_static u8s8``) with
ONNX Runtime's session option ``session.x64quantprecision=1``, which on x86 CPUs without VNNI rewrites
int8 weights outside [-64, 64] to uint8 (the u8u8 kernels) when the session loads.

Latency: batch 1, ``--threads`` intra-op threads, sequential execution, all graph optimisations;
after ``--warmup`` runs each, ``--rounds`` rounds in rotating order, ``--runs`` inferences per
variant per round, each timed alone; the table gives medians and their ratios.

    .venv/bin/python benchmarks/deploy_latency.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from repq_fx.app.bench import round_robin
from repq_fx.export.runtime import optimized_ops
from repq_fx.targets import TARGETS

warnings.filterwarnings("ignore")

# ONNX Runtime's quantize_static data types, per its documentation (the ``quantize_static`` docstring,
# "Choosing parameters for CPU inference", and docs/performance/model-optimizations/quantization.md):
# name -> (activation type, weight type, reduce_range, what ORT says about it)
QUANTIZE_STATIC = {
    "u8s8-reduce-range": ("QUInt8", "QInt8", True, "recommended for x86 without VNNI (7-bit weights)"),
    "u8u8": ("QUInt8", "QUInt8", False, "ORT's other remedy for saturation on x86 without VNNI"),
    "u8s8": ("QUInt8", "QInt8", False, "recommended for x86 with VNNI"),
    "s8s8": ("QInt8", "QInt8", False, "ORT's default data types (QDQ)"),
}
# ORT's session option that rewrites u8s8 QLinearConv/QGemm/... whose int8 weights leave [-64, 64] into u8u8
# when the CPU is x86 without VNNI (Avx2WeightS8ToU8Transformer; off by default): full-range files made
# exact at load time, on the CPUs that need it only
X64_QUANT_PRECISION = {"session.x64quantprecision": "1"}
RECOMMENDED = "quantize_static u8s8-reduce-range"  # ORT's own recommendation for x86 without VNNI: the latency baseline
LATENCY_GOAL = 1.1


def images(size: int, count: int, offset: int = 0) -> list[torch.Tensor]:
    """``count`` 1x3xHxW photographs from skimage.data (crops ``offset`` .. ``offset + count - 1``), ImageNet-normalised."""
    import skimage.data
    from skimage.transform import resize

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat", "hubble_deep_field"]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = []
    for i in range(offset, offset + count):
        img = getattr(skimage.data, names[i % len(names)])()
        h, w = img.shape[:2]
        top, left = (i * 37) % max(1, h - min(h, w) + 1), (i * 53) % max(1, w - min(h, w) + 1)
        side = min(h, w)
        crop = resize(img[top:top + side, left:left + side], (size, size), anti_aliasing=True)
        x = (crop - mean) / std
        out.append(torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32)))
    return out


def set_bn_statistics(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


def quantize_with_ort(pre_path: str, out_path: str, calib: list[torch.Tensor], setting: str) -> None:
    """``quantize_static`` of ``pre_path`` (already through ``quant_pre_process``) with one of
    :data:`QUANTIZE_STATIC`'s settings: QDQ, per-channel weights, MinMax calibration."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    activation, weight, reduce_range, _ = QUANTIZE_STATIC[setting]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x.numpy()} for x in calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(pre_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, activation_type=getattr(QuantType, activation),
                    weight_type=getattr(QuantType, weight))


# ---------------------------------------------------------------------------
# Exactness of ONNX Runtime's int8 kernels on this CPU, layer by layer.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Exactness:
    """Layer-by-layer agreement of one int8 file with its reference (only stretches with a conv/gemm)."""

    layers: int  # stretches holding an integer layer
    exact_layers: int  # of which every value is within one output step
    worst_within: float  # the lowest fraction of values within one step, over the layers
    max_steps: float  # the largest difference, in output steps
    end_to_end_within: float  # fraction of the model's outputs within one step of the reference
    reference: str
    unfused: int = 0  # stretches ORT ran with a float Conv/Gemm (not the int8 kernel): not a test of it

    def cells(self) -> list[str]:
        layers = f"{self.exact_layers}/{self.layers}" + (f" ({self.unfused} not fused)" if self.unfused else "")
        return [layers, f"{100 * self.worst_within:.2f} %", f"{self.max_steps:.0f}", f"{100 * self.end_to_end_within:.2f} %"]


def repq_fx_exactness(path: str, lowered, inputs: Sequence[torch.Tensor], threads: int) -> Exactness:
    """repq_fx's own check: every quantizer's stretch against the lowered model."""
    from repq_fx.export.parity import onnx_runtime_parity, segment_parity

    batch = torch.cat(list(inputs))
    layers = [s for s in segment_parity(path, lowered, (batch,), threads) if s.layers]
    e2e = onnx_runtime_parity(path, lowered, (batch,), threads)
    return Exactness(len(layers), sum(s.max_steps <= 1.001 for s in layers), min(s.within_one_step for s in layers),
                     max(s.max_steps for s in layers), e2e.within_one_step, "the lowered model (repq_fx segment_parity)")


def _ort_session(model_or_path, threads: int, optimize: bool, optimized_path: str | None = None,
                 config: dict[str, str] | None = None):
    """A CPU session (sequential, ``threads`` intra-op threads), all graph optimisations or none, with
    session config entries ``config``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    data = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else model_or_path
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


_FLOAT_LAYERS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul")


def qdq_exactness(path: str, inputs: Sequence[torch.Tensor], threads: int,
                  config: dict[str, str] | None = None) -> Exactness:
    """Any QDQ file against itself run unoptimised (ONNX semantics in float, no int8 kernel).

    Each ``QuantizeLinear`` output that a conv/gemm feeds (and the ``DequantizeLinear`` that reads it)
    is recomputed alone by the optimised session,
    from the *float* tensors that the quantizers opening its stretch read (their reference values; the
    stretch keeps those quantizers, so ORT fuses it as it fuses the whole model: a stretch starting at
    an int8 tensor may not fuse). A stretch ORT still runs with a float conv is counted as not fused
    and left out. Differences in integer steps."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    q_nodes = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in initializers}
    input_name = graph.input[0].name
    infos = {v.name: v for v in list(graph.value_info) + list(graph.output)}
    # a stretch ends at the DequantizeLinear reading its quantizer where there is one: a Q -> DQ pair inside
    # the graph is what ORT rewrites (int8 activations become uint8 on x86) and fuses; a Q whose output
    # leaves the graph is not
    ends = {}
    for t in q_nodes:
        dq = next((n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == t), None)
        if dq is not None:
            scale = onnx.numpy_helper.to_array(next(i for i in graph.initializer if i.name == dq.input[1]))
            ends[t] = (dq.output[0], float(np.asarray(scale).max()))
        else:
            ends[t] = (t, 1.0)
    wanted = list(dict.fromkeys([t for q in q_nodes.values() for t in (q.output[0], q.input[0])]
                                + [end for end, _ in ends.values()]))
    exposed = copy.deepcopy(model)
    known = {o.name for o in exposed.graph.output} | {input_name}
    exposed.graph.output.extend(infos[t] for t in wanted if t not in known)
    reference = _ort_session(exposed, threads, optimize=False)
    names = [o.name for o in reference.get_outputs()]
    values = []
    for x in inputs:
        feed = {input_name: x.numpy()}
        values.append({input_name: feed[input_name], **dict(zip(names, reference.run(None, feed)))})

    def stretch(tensor: str) -> tuple[list[str], bool]:
        """The float tensors read by the quantizers (or model inputs) that open the stretch ending in
        ``tensor``, and whether it holds an integer layer."""
        starts, has_layer, stack, seen = [], False, list(producer[tensor].input), set()
        while stack:
            t = stack.pop()
            if t in seen or not t or t in initializers:
                continue
            seen.add(t)
            if t in q_nodes:
                starts.append(q_nodes[t].input[0])  # keep the quantizer: ORT fuses it as in the whole model
                continue
            if t not in producer:
                starts.append(t)
                continue
            node = producer[t]
            has_layer |= node.op_type in _FLOAT_LAYERS
            stack.extend(node.input)
        return list(dict.fromkeys(starts)), has_layer

    extractor = Extractor(model)
    layers, unfused = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for tensor in q_nodes:
            starts, has_layer = stretch(tensor)
            if not has_layer:
                continue
            end, step = ends[tensor]
            sub = _ort_session(extractor.extract_model(starts, [end]), threads, optimize=True,
                               optimized_path=os.path.join(tmp, "segment.onnx"), config=config)
            if any(n.op_type in _FLOAT_LAYERS for n in onnx.load(os.path.join(tmp, "segment.onnx")).graph.node):
                unfused += 1
                continue
            steps = np.concatenate([np.rint(np.abs(sub.run(None, {s: v[s] for s in starts})[0].astype(np.float64)
                                                   - v[end].astype(np.float64)) / step).ravel() for v in values])
            layers.append((float((steps <= 1).mean()), float(steps.max())))
    # end to end: the model's (float) output, in steps of the DequantizeLinear that produces it
    out = graph.output[0].name
    dq = producer.get(out)
    scale = 1.0
    if dq is not None and dq.op_type == "DequantizeLinear":
        scale = float(onnx.numpy_helper.to_array(next(i for i in graph.initializer if i.name == dq.input[1])).max())
    optimized = _ort_session(path, threads, optimize=True, config=config)
    e2e = np.concatenate([np.abs(optimized.run([out], {input_name: x.numpy()})[0].astype(np.float64)
                                 - v[out].astype(np.float64)).ravel() / scale for x, v in zip(inputs, values)])
    return Exactness(len(layers), sum(m <= 1 for _, m in layers), min((w for w, _ in layers), default=1.0),
                     max((m for _, m in layers), default=0.0), float((e2e <= 1.001).mean()),
                     "the same file run by ORT unoptimised", unfused)


def optimized_ops_with(path: str, config: dict[str, str] | None) -> "collections.Counter[str]":
    """Op types of the graph ONNX Runtime runs for ``path`` with session config ``config``."""
    import collections

    import onnx

    if not config:
        return optimized_ops(path)
    with tempfile.TemporaryDirectory() as tmp:
        _ort_session(path, 1, optimize=True, optimized_path=os.path.join(tmp, "o.onnx"), config=config)
        return collections.Counter(n.op_type for n in onnx.load(os.path.join(tmp, "o.onnx")).graph.node)


def kernel_times(files: dict[str, str], configs: dict[str, dict[str, str]], feeds: dict, runs: int,
                 threads: int) -> dict[str, float]:
    """Per file: the sum over its int8 layers (QLinearConv, QGemm) of each node's median kernel time (ms),
    from ONNX Runtime's profiler, the files' runs interleaved (first 10 runs of each left out). Whole-model
    medians of near-identical graphs can differ by a few % with the order and placement of sessions; the
    kernels' own times say whether the int8 work differs."""
    import collections
    import json

    import onnxruntime as ort

    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in files.items():
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tmp, f"profile{len(sessions)}")
            for key, value in configs.get(name, {}).items():
                options.add_session_config_entry(key, value)
            sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(10 + runs):
            for s in sessions.values():
                s.run(None, feeds)
        out = {}
        for name, s in sessions.items():
            with open(s.end_profiling()) as f:
                events = json.load(f)
            per_node = collections.defaultdict(list)
            for e in events:
                if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                        and e["args"].get("op_name") in ("QLinearConv", "QGemm")):
                    per_node[e["name"]].append(e["dur"])
            out[name] = sum(statistics.median(v[10:]) for v in per_node.values()) / 1e3
    return out


# ---------------------------------------------------------------------------
# The machine.
# ---------------------------------------------------------------------------

def machine() -> str:
    """CPU model and the int8-relevant flags, from lscpu / /proc/cpuinfo."""
    from repq_fx.export.parity import cpu_int8_features

    model = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    wanted = [f for f in ("sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
              if f in flags]
    return f"{model}; flags: {' '.join(wanted) or '?'}; {cpu_int8_features()}; {os.cpu_count()} logical CPUs"


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="repvgg_a0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calib", type=int, default=16, help="calibration images")
    parser.add_argument("--check-images", type=int, default=4, help="other images for the exactness check")
    ort_targets = [t for t in TARGETS if t.startswith("onnxruntime")]  # the others' grids are for other runtimes
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=ort_targets,
                        help="repq_fx deployment targets to export (default: the ONNX Runtime ones)")
    parser.add_argument("--quantize-static", nargs="+", choices=list(QUANTIZE_STATIC), default=list(QUANTIZE_STATIC),
                        help="ORT quantize_static settings (default: all)")
    parser.add_argument("--torch", action="store_true",
                        help="also time the PyTorch float model and the lowered model (exact integer simulation)")
    parser.add_argument("--no-check", action="store_true", help="skip the layer-by-layer exactness check")
    parser.add_argument("--kernel-profile", type=int, default=0, metavar="RUNS",
                        help="also profile RUNS interleaved runs per int8 file and report the int8 kernels' time")
    parser.add_argument("--no-x64-quant-precision", action="store_true",
                        help="do not add the full-range files run with ORT's session.x64quantprecision=1")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import timm
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from timm.utils import reparameterize_model

    import repq_fx

    torch.manual_seed(0)
    calib = images(args.size, args.calib)
    check = images(args.size, args.check_images, offset=args.calib)
    model = set_bn_statistics(timm.create_model(args.model, pretrained=False), calib)
    merged = reparameterize_model(copy.deepcopy(model))
    x = calib[0]
    workdir = tempfile.mkdtemp(prefix="repq_deploy_")
    float_path = os.path.join(workdir, "float.onnx")
    torch.onnx.export(merged, (x,), float_path, input_names=["input"], output_names=["output"],
                      dynamo=True, optimize=True, external_data=False, verbose=False)  # one file: optimized_ops
    pre_path = os.path.join(workdir, "float_pre.onnx")
    quant_pre_process(float_path, pre_path)

    files: dict[str, str] = {"ort float (timm merged)": float_path}
    lowered_models = {}
    for target in args.targets:
        qmodel = repq_fx.prepare(model, repq_fx.QConfig(target=target))
        repq_fx.calibrate(qmodel, calib)
        lowered = repq_fx.lower(qmodel)
        path = os.path.join(workdir, f"repq_fx-{target}.onnx")
        repq_fx.export_onnx(lowered, (x,), path)  # onnxruntime-vnni warns: exact only on VNNI CPUs
        files[f"repq_fx {target}"] = path
        lowered_models[f"repq_fx {target}"] = lowered
    for setting in args.quantize_static:
        path = os.path.join(workdir, f"quantize_static-{setting}.onnx")
        quantize_with_ort(pre_path, path, calib, setting)
        files[f"quantize_static {setting}"] = path
    configs: dict[str, dict[str, str]] = {}
    if not args.no_x64_quant_precision:
        for name in ("repq_fx onnxruntime-vnni", "quantize_static u8s8"):
            if name in files:
                files[f"{name} + x64quantprecision"] = files[name]
                configs[f"{name} + x64quantprecision"] = X64_QUANT_PRECISION

    feeds = {"input": x.numpy()}
    sessions = {name: _ort_session(path, args.threads, optimize=True, config=configs.get(name))
                for name, path in files.items()}
    runners = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
    if args.torch:
        def torch_runner(m):
            def run():
                with torch.no_grad():
                    m(x)
            return run

        runners["torch timm merged (float)"] = torch_runner(merged)
        first = next(iter(lowered_models), None)
        if first:
            runners[f"torch {first} lowered (integer simulation)"] = torch_runner(lowered_models[first])

    exactness: dict[str, list[Exactness]] = {}  # int8 files: against their references
    if not args.no_check:
        for name, path in files.items():
            if name in lowered_models:
                exactness[name] = [repq_fx_exactness(path, lowered_models[name], check, args.threads)]
            if name != "ort float (timm merged)":
                exactness.setdefault(name, []).append(qdq_exactness(path, check, args.threads, configs.get(name)))

    times = round_robin(runners, args.rounds, warmup=args.warmup, repeat=args.runs)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    int8_files = {name: path for name, path in files.items() if name != "ort float (timm merged)"}
    kernels = kernel_times(int8_files, configs, feeds, args.kernel_profile, args.threads) if args.kernel_profile else {}

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, repq_fx {_git()}, torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}, timm {timm.__version__}")
    print(f"machine: {machine()}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"model {args.model}, input 1x3x{args.size}x{args.size}, threads {args.threads}, {args.rounds} rounds x "
          f"{args.runs} runs (medians), exactness on {len(check)} other images"
          + (f", int8 kernels profiled over {args.kernel_profile} runs" if args.kernel_profile else "") + "\n")
    base = med["ort float (timm merged)"]
    recommended = med.get(RECOMMENDED)
    profiled = "| int8 kernels (profiler) | vs the same |" if kernels else ""
    print(f"| ONNX file | ORT runs (QLinearConv / QGemm / float Conv) | median latency | vs float | vs {RECOMMENDED} "
          f"{profiled}")
    print("|---|---|---:|---:|---:|" + ("---:|---:|" if kernels else ""))
    for name, path in files.items():
        ops = optimized_ops_with(path, configs.get(name))
        what = f"{ops.get('QLinearConv', 0)} / {ops.get('QGemm', 0)} / {ops.get('Conv', 0) + ops.get('FusedConv', 0)}"
        vs_rec = f"{med[name] / recommended:.2f}x" if recommended else ""
        kernel = ""
        if kernels and name in kernels:
            kernel = (f" {kernels[name]:.2f} ms | "
                      + (f"{kernels[name] / kernels[RECOMMENDED]:.2f}x |" if RECOMMENDED in kernels else " |"))
        elif kernels:
            kernel = " | |"
        print(f"| {name} | {what} | {med[name]:.2f} ms | {med[name] / base:.2f}x | {vs_rec} |{kernel}")
    for name in runners:
        if name.startswith("torch"):
            print(f"| {name} | | {med[name]:.2f} ms | {med[name] / med['torch timm merged (float)']:.2f}x of torch float | |")
    if exactness:
        print(f"\nExactness of ONNX Runtime's int8 kernels on this CPU, layer by layer ({len(check)} images not used "
              "for calibration):\n")
        print("| ONNX file | reference | layers within one step everywhere | worst layer: values within one step "
              "| max steps | model output within one step |")
        print("|---|---|---:|---:|---:|---:|")
        for name, results in exactness.items():
            for e in results:
                print(f"| {name} | {e.reference} | " + " | ".join(e.cells()) + " |")
    print()
    for setting in args.quantize_static:
        activation, weight, reduce_range, note = QUANTIZE_STATIC[setting]
        print(f"quantize_static {setting}: activation_type={activation}, weight_type={weight}, "
              f"reduce_range={reduce_range}, per_channel=True, QDQ: {note}")
    if recommended and "repq_fx onnxruntime" in med:
        ratio = med["repq_fx onnxruntime"] / recommended
        print(f"\nrepq_fx onnxruntime / {RECOMMENDED}: {ratio:.2f}x "
              f"(goal <= {LATENCY_GOAL}x: {'met' if ratio <= LATENCY_GOAL else 'missed'})")
        if RECOMMENDED in kernels and "repq_fx onnxruntime" in kernels:
            print(f"the same, int8 kernels only (profiler): "
                  f"{kernels['repq_fx onnxruntime'] / kernels[RECOMMENDED]:.3f}x")
    if "repq_fx onnxruntime-u8u8" in med and "repq_fx onnxruntime" in med:
        print(f"repq_fx onnxruntime-u8u8 / repq_fx onnxruntime: "
              f"{med['repq_fx onnxruntime-u8u8'] / med['repq_fx onnxruntime']:.2f}x")
    outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
    print("top-1 class: " + ", ".join(f"{name} {int(np.argmax(o))}" for name, o in outputs.items()))


if __name__ == "__main__":
    main()
