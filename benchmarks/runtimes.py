"""One trained int8 model on every runtime: ONNX Runtime, OpenVINO, ExecuTorch/XNNPACK; int8 vs float, side by side.

For each timm model (random weights, BN statistics set on random data, BN gains times ``--bn-gain``
so that the random network does not amplify rounding ties without bound), one repq_fx int8 model:
``prepare(QConfig(target=--target))`` -> ``calibrate`` (random data) -> ``lower``. Every runtime runs
that same lowered model (the default target's grid is exact in all three: ``|w| <= 64`` behind
uint8 inputs for the 16-bit pair sums of ONNX Runtime's and oneDNN's x86 kernels; XNNPACK gets the
same grid shifted to int8), and the float counterpart is ``repq_fx.merge(model)`` (one float conv per
block) in the same runtime:

- ``onnxruntime``: ``export_onnx`` (QDQ) / float ONNX, CPU session;
- ``openvino``: the same two ONNX files, ``compile_model("CPU")``, f32 inference precision;
- ``executorch-xnnpack``: ``export_pte`` (every conv delegated, int8) / float ``.pte`` (XNNPACK fp32),
  one ``.pte`` per batch size (static shapes);
- ``pytorch``: ``repq_fx.compile_int8`` (oneDNN int8 convs through ``torch.compile``) / the merged float
  model run eagerly, as a PyTorch user runs it.

A runtime is a row of :data:`BACKENDS` (name -> the package it needs, a builder of its int8 and of
its float runner); add one with :func:`register`. Parity: each int8 runtime's outputs on the timed
batch against the lowered PyTorch model, in output quantization steps (fraction within one step,
largest difference) and top-1 agreement. Latency: ``--threads`` threads, batch 1 and 32, medians of
``--rounds`` rounds x ``--runs`` runs in rotating order (:func:`repq_fx.app.bench.round_robin`).

    .venv/bin/python benchmarks/runtimes.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deploy_latency import _git, machine, set_bn_statistics  # noqa: E402  (the CPU line of the other latency tables)

from repq_fx.app.bench import round_robin  # noqa: E402

warnings.filterwarnings("ignore")

Runner = Callable[[torch.Tensor], list]  # input batch -> flattened outputs (arrays or tensors)


@dataclass
class Workload:
    """What every backend builds from: the float model, its merged float model, the lowered int8 model."""

    name: str
    model: nn.Module
    merged: nn.Module
    lowered: torch.fx.GraphModule
    workdir: str
    threads: int
    cache: dict  # files shared between backends (the ONNX files)
    input_shape: tuple[int, ...] = (3, 224, 224)  # one input, without the batch


@dataclass(frozen=True)
class Backend:
    """One runtime: the package it needs and, for a workload and an example batch, its int8 and float runners
    (each with a note on what it runs, e.g. how many convs are int8)."""

    name: str
    package: str
    int8: Callable[[Workload, torch.Tensor], tuple[Runner, str]]
    float: Callable[[Workload, torch.Tensor], tuple[Runner, str]]

    def available(self) -> bool:
        import importlib.util

        return importlib.util.find_spec(self.package) is not None


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a runtime row (e.g. ``pytorch-inductor``); a name already there is replaced."""
    BACKENDS[backend.name] = backend
    return backend


# --- ONNX files, shared by ONNX Runtime and OpenVINO ----------------------------------------------

def _onnx_int8(w: Workload, x: torch.Tensor) -> str:
    import repq_fx

    if "int8.onnx" not in w.cache:
        path = os.path.join(w.workdir, f"{w.name}-int8.onnx")
        repq_fx.export_onnx(w.lowered, (x[:1],), path)  # dynamic batch
        w.cache["int8.onnx"] = path
    return w.cache["int8.onnx"]


def _onnx_float(w: Workload, x: torch.Tensor) -> str:
    from repq_fx.export.float_onnx import export_float

    if "float.onnx" not in w.cache:
        path = os.path.join(w.workdir, f"{w.name}-float.onnx")
        export_float(w.merged, (x[:1],), path)
        w.cache["float.onnx"] = path
    return w.cache["float.onnx"]


def _ort_runner(path: str, threads: int) -> Runner:
    from repq_fx.export.runtime import session

    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.numpy()})


def _ort_int8(w: Workload, x: torch.Tensor) -> tuple[Runner, str]:
    from repq_fx.export.runtime import optimized_ops

    path = _onnx_int8(w, x)
    ops = optimized_ops(path)
    return _ort_runner(path, w.threads), f"{ops.get('QLinearConv', 0)} QLinearConv, {ops.get('Conv', 0)} float Conv"


def _ort_float(w: Workload, x: torch.Tensor) -> tuple[Runner, str]:
    return _ort_runner(_onnx_float(w, x), w.threads), "float ONNX"


def _ov_runner(path: str, threads: int) -> tuple[Runner, str]:
    from repq_fx.export.openvino_ir import INT8, compile_model, run, runtime_precisions

    compiled = compile_model(path, threads)
    counts = runtime_precisions(compiled)
    int8 = sum(n for (k, p), n in counts.items() if k == "Convolution" and p in INT8)
    fp = sum(n for (k, p), n in counts.items() if k == "Convolution" and p not in INT8)
    request = compiled.create_infer_request()
    output = compiled.outputs[0]
    return (lambda x: [request.infer({0: x.numpy()})[output]]), f"{int8} int8 / {fp} f32 Convolution"


def _ov_int8(w: Workload, x: torch.Tensor) -> tuple[Runner, str]:
    return _ov_runner(_onnx_int8(w, x), w.threads)


def _ov_float(w: Workload, x: torch.Tensor) -> tuple[Runner, str]:
    return _ov_runner(_onnx_float(w, x), w.threads)


def _pte_runner(path: str, threads: int) -> Runner:
    from repq_fx.export.executorch_pte import load_pte

    method = load_pte(path, threads)
    return lambda x: list(method.execute((x,)))


def _et_int8(w: Workload, x: torch.Tensor) -> tuple[Runner, str]:
    from repq_fx.export.executorch_pte import export_pte

    path = os.path.join(w.workdir, f"{w.name}-int8-b{x.shape[0]}.pte")
    result = export_pte(w.lowered, (x,), path, check=False)
    d = result.delegation
    return _pte_runner(path, w.threads), f"{d.delegated_convs}/{d.delegated_convs + d.non_delegated_convs} convs delegated"


def _et_float(w: Workload, x: torch.Tensor) -> tuple[Runner, str]:
    from repq_fx.export.executorch_pte import export_float_pte

    path = os.path.join(w.workdir, f"{w.name}-float-b{x.shape[0]}.pte")
    d = export_float_pte(w.merged, (x,), path)
    return _pte_runner(path, w.threads), f"{d.delegated_convs}/{d.delegated_convs + d.non_delegated_convs} convs delegated"


def _torch_int8(w: Workload, x: torch.Tensor) -> tuple[Runner, str]:
    import repq_fx
    from repq_fx.compiling_int8 import int8_ops_compiled

    if "compile_int8" not in w.cache:  # one module; it recompiles per batch size (static shapes)
        w.cache["compile_int8"] = repq_fx.compile_int8(w.lowered, dynamic=False)
    fast = w.cache["compile_int8"]
    ops = int8_ops_compiled(fast, (x,))
    return (lambda x: [fast(x)]), f"{ops} oneDNN int8 ops (torch.compile)"


def _torch_float(w: Workload, x: torch.Tensor) -> tuple[Runner, str]:
    def run(x: torch.Tensor) -> list:
        with torch.no_grad():
            return [w.merged(x)]

    return run, "merged float, eager"


register(Backend("pytorch", "torchao", _torch_int8, _torch_float))
register(Backend("onnxruntime", "onnxruntime", _ort_int8, _ort_float))
register(Backend("openvino", "openvino", _ov_int8, _ov_float))
register(Backend("executorch-xnnpack", "executorch", _et_int8, _et_float))


# --- the workload ----------------------------------------------------------------------------------

def build_trained(float_ckpt: str, int8_ckpt: str, threads: int, workdir: str) -> Workload:
    """A network trained by ``repq-fx train`` (e.g. the Fashion-MNIST RepVGGNet of ``make demo``): its float
    checkpoint merged, its quantized checkpoint lowered."""
    import repq_fx
    from repq_fx.app.train import TrainConfig, restore

    model, _ = restore(float_ckpt)
    qmodel, ckpt = restore(int8_ckpt)
    config = TrainConfig.from_dict(ckpt["config"])
    shape = (1, 28, 28) if config.data == "fashion-mnist" else tuple(config.input_size or (3, 224, 224))
    merged = repq_fx.merge(copy.deepcopy(model).eval()).eval()
    name = f"{config.model.split(':')[-1]} ({config.data}, trained)"
    return Workload(name, model.eval(), merged, repq_fx.lower(qmodel), workdir, threads, {}, shape)


def build(name: str, size: int, target: str, bn_gain: float, calib_batches: int, threads: int,
          workdir: str) -> Workload:
    """timm ``name`` (random weights), BN statistics from random data times ``bn_gain``, merged and lowered."""
    import timm

    import repq_fx

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    calib = [torch.randn(8, 3, size, size) for _ in range(calib_batches)]
    set_bn_statistics(model, calib)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(bn_gain)
    model.eval()
    merged = repq_fx.merge(copy.deepcopy(model)).eval()
    qmodel = repq_fx.prepare(model, repq_fx.QConfig(target=target))
    repq_fx.calibrate(qmodel, calib)
    lowered = repq_fx.lower(qmodel)
    return Workload(name, model, merged, lowered, workdir, threads, {}, (3, size, size))


@dataclass
class Row:
    model: str
    backend: str
    batch: int
    int8_ms: float | None
    float_ms: float | None
    int8_note: str
    float_note: str
    within: float | None
    max_steps: float | None
    top1: float | None
    error: str = ""


def measure(w: Workload, backends: Sequence[Backend], batch: int, args: argparse.Namespace) -> list[Row]:
    from repq_fx.export.parity import step_agreement

    torch.manual_seed(batch)
    x = torch.randn(batch, *w.input_shape)
    with torch.no_grad():
        ref = w.lowered(x)
    runners: dict[str, Runner] = {}
    rows: dict[str, Row] = {}
    for b in backends:
        row = Row(w.name, b.name, batch, None, None, "", "", None, None, None)
        rows[b.name] = row
        try:
            run8, row.int8_note = b.int8(w, x)
            runf, row.float_note = b.float(w, x)
        except Exception as e:  # noqa: BLE001 - a runtime that fails is reported in its row, the others go on
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        out = run8(x)
        row.within, row.max_steps, _ = step_agreement(out, w.lowered, (x,))
        got = np.asarray(out[0]).reshape(ref.shape)
        row.top1 = float((got.argmax(1) == ref.argmax(1).numpy()).mean())
        runners[f"{b.name} int8"] = lambda r=run8: r(x)
        runners[f"{b.name} float"] = lambda r=runf: r(x)
    times = round_robin(runners, args.rounds, warmup=args.warmup, repeat=args.runs)
    for key, t in times.items():
        backend, kind = key.rsplit(" ", 1)
        setattr(rows[backend], f"{kind}_ms", statistics.median(t) * 1e3)
    return list(rows.values())


def table(rows: Sequence[Row]) -> str:
    lines = ["| model | runtime | batch | int8 median | float median | int8 speed-up | int8: outputs within one step "
             "(max steps) | top-1 = lowered | int8 runs | float runs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.backend} | {r.batch} | failed: {r.error} | | | | | | |")
            continue
        lines.append(f"| {r.model} | {r.backend} | {r.batch} | {r.int8_ms:.2f} ms | {r.float_ms:.2f} ms | "
                     f"{r.float_ms / r.int8_ms:.2f}x | {100 * r.within:.2f} % ({r.max_steps:.0f}) | "
                     f"{100 * r.top1:.0f} % | {r.int8_note} | {r.float_note} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["repvgg_a0", "mobileone_s0"])
    parser.add_argument("--backends", nargs="+", default=None, help=f"default: every installed one of {list(BACKENDS)}")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5, help="runs per variant per round (batch 1; 1 at larger batches)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--target", default="onnxruntime", help="the QConfig target every runtime's model is trained for")
    parser.add_argument("--bn-gain", type=float, default=0.5)
    parser.add_argument("--calib-batches", type=int, default=2, help="random calibration batches of 8")
    parser.add_argument("--trained", nargs=2, metavar=("FLOAT_CKPT", "INT8_CKPT"), help="also a network trained by "
                        "`repq-fx train`, e.g. make demo's .demo/fp_e10.pt .demo/repq-bn_w8a8_e1.pt")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    names = args.backends or [n for n, b in BACKENDS.items() if b.available()]
    missing = [n for n, b in BACKENDS.items() if not b.available()]
    backends = [BACKENDS[n] for n in names]
    workdir = tempfile.mkdtemp(prefix="repq_runtimes_")
    rows: list[Row] = []
    workloads = [lambda m=m: build(m, args.size, args.target, args.bn_gain, args.calib_batches, args.threads, workdir)
                 for m in args.models]
    if args.trained:
        workloads.append(lambda: build_trained(*args.trained, args.threads, workdir))
    for make in workloads:
        w = make()
        model = w.name
        for batch in args.batches:
            runs = args.runs if batch == 1 else 1
            rows += measure(w, backends, batch, argparse.Namespace(**{**vars(args), "runs": runs}))
            print(table([r for r in rows if r.model == model and r.batch == batch]), flush=True)

    versions = []
    for pkg in ("onnxruntime", "openvino", "executorch", "timm"):
        try:
            versions.append(f"{pkg} {__import__(pkg).__version__}")
        except (ImportError, AttributeError):
            from importlib.metadata import PackageNotFoundError, version

            try:
                versions.append(f"{pkg} {version(pkg)}")
            except PackageNotFoundError:
                pass
    print(f"\n{datetime.datetime.now():%Y-%m-%d %H:%M}, repq_fx {_git()}, torch {torch.__version__}, "
          + ", ".join(versions))
    print(f"machine: {machine()}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"{args.size}x{args.size}, threads {args.threads}, target {args.target!r}, BN gain {args.bn_gain}, "
          f"{args.rounds} rounds x {args.runs} runs at batch 1 (x 1 at larger batches), medians"
          + (f"; not installed: {', '.join(missing)}" if missing else "") + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
