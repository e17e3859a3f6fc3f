"""The end-to-end demo behind ``make demo``: Fashion-MNIST -> float RepVGG -> RepQ QAT -> int8 ONNX Runtime.

Steps, on the small RepVGG of ``examples:RepVGGNet`` (9 RepVGG blocks, widths 32/64/128):

1. float training on the 60,000 Fashion-MNIST training images (``repq_fx.app.train``);
2. RepQ quantization-aware training from that checkpoint (``prepare`` with ``bn_mode="batch"``,
   ``calibrate``, SGD), W8A8 by default;
3. ``lower`` (one int8 conv per block) and ``export_onnx`` (QDQ ONNX);
4. ONNX Runtime on the 10,000 test images: int8 accuracy, agreement with the lowered PyTorch
   model, the ops of ORT's optimized graph, and batch-1 latency next to the float ONNX of
   ``repq_fx.merge`` of the float model; then one line for each other runtime installed
   (ExecuTorch with XNNPACK, OpenVINO): the same lowered model's file, its top-1 and its class
   agreement with the lowered PyTorch model.

Every figure printed is measured in this run. Checkpoints go to ``workdir``; with ``resume`` a
finished step is reused (delete the folder to start over).

>>> DemoConfig().bits
(8, 8)
"""
from __future__ import annotations

import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..export.float_onnx import export_float
from ..export.parity import output_steps, segment_parity
from ..export.runtime import optimized_ops, session


MODEL = "examples:RepVGGNet"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains; the defaults take about 6 minutes on 2 CPU cores (measured 6.0 min)."""

    fp_epochs: int = 4
    qat_epochs: int = 1
    bits: tuple[int, int] = (8, 8)
    method: str = "repq-bn"
    subset: int | None = None  # training images (None: all 60,000)
    test_subset: int | None = None  # test images (None: all 10,000)
    latency_runs: int = 200
    workdir: str = ".demo"
    resume: bool = True
    seed: int = 0


def run_demo(config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print,
             progress: bool = True) -> dict[str, float]:
    """Run the demo; returns the figures it printed (accuracies in %, latencies in ms)."""
    import repq_fx
    from .train import TrainConfig, make_loaders, restore, run_training

    _require_data()
    work = Path(config.workdir)
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, float] = {}
    threads = torch.get_num_threads()
    w, a = config.bits
    log(f"repq_fx demo: {MODEL} on Fashion-MNIST, {threads} torch threads; checkpoints in {work}/")

    fp_ckpt, q_ckpt = work / f"fp_e{config.fp_epochs}.pt", work / f"{config.method}_w{w}a{a}_e{config.qat_epochs}.pt"
    fp = TrainConfig(model=MODEL, epochs=config.fp_epochs, subset=config.subset, test_subset=config.test_subset,
                     seed=config.seed)
    start = time.perf_counter()
    log(f"\n[1/4] float training, {config.fp_epochs} epochs")
    metrics = run_training(fp, fp_ckpt, resume=config.resume, overwrite=not config.resume, progress=progress,
                           log=lambda s: log(f"  {s}"))
    figures["fp_top1"], figures["fp_seconds"] = metrics["top1"], time.perf_counter() - start

    qat = TrainConfig(model=MODEL, method=config.method, bits=config.bits, epochs=config.qat_epochs,
                      subset=config.subset, test_subset=config.test_subset, seed=config.seed, from_ckpt=str(fp_ckpt))
    start = time.perf_counter()
    log(f"\n[2/4] RepQ QAT ({config.method}, W{w}A{a}), {config.qat_epochs} epoch(s) from the float checkpoint")
    metrics = run_training(qat, q_ckpt, resume=config.resume, overwrite=not config.resume, progress=progress,
                           log=lambda s: log(f"  {s}"))
    figures["qat_top1"], figures["qat_seconds"] = metrics["top1"], time.perf_counter() - start

    log("\n[3/4] lower to one int8 conv per block, export QDQ ONNX")
    qmodel, _ = restore(q_ckpt)
    float_model, _ = restore(fp_ckpt)
    lowered = repq_fx.lower(qmodel)
    example = (torch.randn(1, 1, 28, 28),)
    int8_path, float_path = str(work / "repvggnet_int8.onnx"), str(work / "repvggnet_float.onnx")
    repq_fx.export_onnx(lowered, example, int8_path)
    export_float(repq_fx.merge(float_model), example, float_path)
    ops = optimized_ops(int8_path)
    blocks = sum(type(m).__name__ == "QuantizedConv2d" for m in lowered.modules())
    log(f"  {blocks} blocks -> {blocks} QuantizedConv2d; ONNX Runtime's optimized graph: "
        f"{ops.get('QLinearConv', 0)} QLinearConv, {ops.get('QGemm', 0)} QGemm, {ops.get('Conv', 0)} float Conv")
    log(f"  wrote {int8_path} ({os.path.getsize(int8_path) / 1024:.0f} KiB) and {float_path} "
        f"({os.path.getsize(float_path) / 1024:.0f} KiB)")

    log("\n[4/4] ONNX Runtime on the Fashion-MNIST test set")
    _, test_loader = make_loaders(qat)
    int8_session = session(int8_path)
    correct = agree = count = fq_agree = 0
    lowered_correct = 0
    fq_steps = 0.0
    step = output_steps(lowered)[0]
    qmodel.eval()
    layers = None
    test_set: list[tuple[torch.Tensor, ...]] = []  # (images, labels, lowered's classes, ONNX Runtime's classes)
    for x, y in test_loader:
        out = int8_session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = lowered(x).numpy()
            fake = qmodel(x).numpy()
        if layers is None:  # ORT layer by layer, on the lowered model's own inputs to each layer
            layers = segment_parity(int8_path, lowered, (x,))
        correct += int((out.argmax(1) == y.numpy()).sum())
        lowered_correct += int((ref.argmax(1) == y.numpy()).sum())
        agree += int((out.argmax(1) == ref.argmax(1)).sum())
        fq_agree += int((fake.argmax(1) == ref.argmax(1)).sum())
        fq_steps = max(fq_steps, float(np.abs(fake - ref).max()) / step)
        count += len(y)
        test_set.append((x, y, torch.from_numpy(ref.argmax(1)), torch.from_numpy(out.argmax(1))))
    figures["ort_int8_top1"] = 100.0 * correct / count
    figures["lowered_top1"] = 100.0 * lowered_correct / count
    figures["argmax_agreement"] = 100.0 * agree / count
    figures["fake_quant_agreement"] = 100.0 * fq_agree / count
    figures["fake_quant_max_steps"] = fq_steps
    figures["ort_layers_ok"], figures["ort_layers"] = float(sum(s.ok for s in layers)), float(len(layers))
    log(f"  ONNX Runtime layer by layer: {sum(s.ok for s in layers)} of {len(layers)} quantizers within one step "
        f"on >= 99.9 % of their outputs (worst {min(s.within_one_step for s in layers) * 100:.3f} %)")
    lat_int8 = _latency(int8_session, config.latency_runs)
    lat_float = _latency(session(float_path), config.latency_runs)
    figures["ort_int8_ms"], figures["ort_float_ms"] = lat_int8, lat_float

    log("\n  result                                        value")
    log(f"  float model, PyTorch                  top-1 {figures['fp_top1']:6.2f} %   ({figures['fp_seconds']:.0f} s)")
    log(f"  RepQ W{w}A{a} fake quant, PyTorch        top-1 {figures['qat_top1']:6.2f} %   "
        f"({figures['qat_seconds']:.0f} s)")
    log(f"  lowered int8 model, PyTorch           top-1 {figures['lowered_top1']:6.2f} %   (same class as fake "
        f"quant on {figures['fake_quant_agreement']:.2f} %, at most {fq_steps:.0f} output steps apart)")
    log(f"  int8 QDQ ONNX, ONNX Runtime           top-1 {figures['ort_int8_top1']:6.2f} %   "
        f"(same class as PyTorch lowered on {figures['argmax_agreement']:.2f} % of images)")
    log(f"  latency, batch 1, ONNX Runtime 1 thread: float (merged) {lat_float:.3f} ms, int8 {lat_int8:.3f} ms "
        f"({lat_float / lat_int8:.2f}x)")
    with _runtime_chatter_captured():
        _other_runtimes(lowered, example[0], test_set, work, config.latency_runs, figures, log)
    return figures


@contextlib.contextmanager
def _runtime_chatter_captured():
    """The runtimes' own log lines are kept out of the demo's output: everything written to stderr (file
    descriptor 2: ExecuTorch's C++ cpuinfo and thread-pool lines, which its bindings also send through
    ``sys.stderr``, and torch.compile's log lines) goes to a temporary file, printed only if the block fails.
    Other packages' Python warnings are dropped; repq_fx's own warnings are shown after the block."""
    original = sys.stderr
    original.flush()
    with tempfile.TemporaryFile(mode="w+b") as captured:
        saved = os.dup(2)
        text = open(captured.fileno(), "w", buffering=1, closefd=False, errors="backslashreplace")
        handlers = [h for h in _stream_handlers() if h.stream is original]  # torch's loggers hold sys.stderr
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                os.dup2(captured.fileno(), 2)
                _point_stderr_at(text, handlers)
                try:
                    yield
                finally:
                    _point_stderr_at(original, handlers)
                    text.flush()
                    os.dup2(saved, 2)
        except BaseException:  # stderr is given back by now: show what the runtimes said
            captured.seek(0)
            original.write(captured.read().decode(errors="replace"))
            raise
        finally:
            text.close()
            os.close(saved)
    package = Path(sys.modules[__name__.split(".")[0]].__file__).resolve().parent
    for w in caught:
        if Path(w.filename).resolve().is_relative_to(package):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _point_stderr_at(stream, handlers: list[logging.StreamHandler]) -> None:
    sys.stderr = stream
    for handler in handlers:
        handler.setStream(stream)


def _stream_handlers() -> list[logging.StreamHandler]:
    """Every logging handler that writes to a stream, on the root logger and on every named logger."""
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    return [h for logger in loggers for h in logger.handlers if isinstance(h, logging.StreamHandler)]


def _other_runtimes(lowered: torch.nn.Module, example: torch.Tensor, test_set: list, work: Path, runs: int,
                    figures: dict[str, float], log: Callable[[str], None]) -> None:
    """One line per other runtime on this machine (:mod:`repq_fx.export.formats`): the same lowered model's
    file, its top-1, its class agreement with the lowered PyTorch model and its batch-1 latency."""
    from ..export.formats import FORMATS

    others = [f for f in FORMATS.values() if f.name != "onnx"]
    missing = [f.runtime for f in others if not f.available]
    log("\n  the same int8 model in the other runtimes on this machine"
        + (f" (not installed: {', '.join(missing)}; `make setup` installs them)" if missing else ""))
    for fmt in (f for f in others if f.available):
        path = str(work / f"repvggnet_int8{fmt.suffix}")
        fmt.write(lowered, example, path, None)
        run = fmt.load(path, 1)
        top1, agree = _top1_and_agreement(run, test_set, against=2)
        latency = _median_ms(lambda: run(example), runs)
        figures[f"{fmt.name}_int8_top1"], figures[f"{fmt.name}_agreement"] = top1, agree
        figures[f"{fmt.name}_int8_ms"] = latency
        log(f"  int8 {os.path.basename(path):<22} {fmt.runtime:<21} top-1 {top1:6.2f} %   (same "
            f"class as PyTorch lowered on {agree:.2f} %), batch 1 {latency:.3f} ms")
    _pytorch_int8(lowered, example, test_set, runs, figures, log)


def _pytorch_int8(lowered: torch.nn.Module, example: torch.Tensor, test_set: list, runs: int,
                  figures: dict[str, float], log: Callable[[str], None]) -> None:
    """The lowered model as oneDNN int8 convs in PyTorch itself (:func:`repq_fx.compile_int8`): top-1, class
    agreement with the ONNX export, batch-1 latency."""
    import repq_fx
    from ..errors import CompileError

    try:
        fast = repq_fx.compile_int8(lowered, (example,))
    except (CompileError, RuntimeError) as e:  # no TorchAO or oneDNN (CompileError), no C++ compiler for inductor
        log(f"  int8 PyTorch (torch.compile): not run ({str(e).splitlines()[0]})")
        return
    top1, agree = _top1_and_agreement(fast, test_set, against=3)
    latency = _median_ms(lambda: fast(example), runs)
    figures["pytorch_int8_top1"], figures["pytorch_int8_agreement"] = top1, agree
    figures["pytorch_int8_ms"] = latency
    log(f"  int8 PyTorch (repq_fx.compile_int8)  oneDNN int8 convs     top-1 {top1:6.2f} %   "
        f"(same class as ONNX Runtime on {agree:.2f} %), batch 1 {latency:.3f} ms")


def _top1_and_agreement(run: Callable[[torch.Tensor], torch.Tensor], test_set: list, against: int) -> tuple[float, float]:
    """Top-1 (%) of ``run`` on the test set, and how often (%) its class is the one in column ``against`` of
    ``test_set`` (2: the lowered PyTorch model's, 3: ONNX Runtime's)."""
    correct = agree = count = 0
    for batch in test_set:
        classes = run(batch[0]).argmax(1)
        correct += int((classes == batch[1]).sum())
        agree += int((classes == batch[against]).sum())
        count += len(batch[1])
    return 100.0 * correct / count, 100.0 * agree / count


def _median_ms(call: Callable[[], object], runs: int) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _require_data() -> None:
    from .data.fashion_mnist import load_fashion_mnist

    load_fashion_mnist("test")  # raises DatasetNotFoundError, saying how to install the package


def _latency(session, runs: int) -> float:
    x = {"input": np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)}
    return _median_ms(lambda: session.run(None, x), runs)


__all__ = ["DemoConfig", "run_demo"]
