"""``repq-fx bench``: a QAT step of the float model against RepQ-BN and RepQ-BNEst, and batch-1 ONNX
Runtime latency of the float and int8 models, timed round robin in one process.

>>> _ms(0.0123), _ms(0.00123), _plural(1, "round"), _plural(3, "round")
('12.3', '1.230', '1 round', '3 rounds')
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from ... import merge
from ...config import QConfig
from ...errors import RepQError
from ..models import resolve_model
from .common import _calibrated, _data_size, _example_size, _restore_quantized
from .options import EPILOG, _add_capture_option, _at_least, _bits, _size, _table


BENCH_DESCRIPTION = """\
Time MODEL on this machine's CPU, float against RepQ, every variant built in this one process:

  step     one quantization-aware training step at --batch: zero_grad, forward, cross-entropy on random
           labels (mean squared error to a random target if the output is not batch x classes), backward,
           SGD step; of the float model in train mode, of RepQ-BN (prepare, bn_mode="batch") and of
           RepQ-BNEst (bn_mode="estimate"), both calibrated on 2 random batches; with --compile also each
           one compiled (repq_fx.compile: torch.compile, inductor), after one untimed compiling step
  latency  batch-1 ONNX Runtime latency of the float deploy model (merge, float ONNX) and of the int8
           QDQ model (prepare, calibrate on 4 random batches, lower, export_onnx; or the model of --ckpt)

After --warmup untimed runs of each variant come --rounds rounds: each round runs every variant (latency:
%d runs each) in an order that rotates from round to round, and times each run alone. Printed: the median,
the interquartile range (IQR) and the ratio of medians to float. Weights and inputs are random: the figures
are of speed, not accuracy. Other jobs on the machine move them: compare ratios from one run.

  repq-fx bench timm:repvgg_a0 --threads 2
  repq-fx bench timm:repvgg_a0 --threads 2 --what step --compile
  repq-fx bench examples:RepVGGNet --input-size 1x28x28 --batch 64 --what step
  repq-fx bench examples:RepVGGNet --what latency --ckpt w8a8.pt
"""
BENCH_VARIANTS = {"float": None, "repq-bn": "batch", "repq-bnest": "estimate"}  # name -> bn_mode of prepare
LATENCY_RUNS = 10  # ONNX Runtime runs of each model per round
BENCH_SIZE = (3, 64, 64)  # default input: small, so that a training step of a timm model takes well under a second


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", help="time a QAT step (float vs RepQ) and int8 vs float ONNX Runtime latency",
                            description=BENCH_DESCRIPTION % LATENCY_RUNS, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model spec, e.g. timm:repvgg_a0 or examples:RepVGGNet")
    p.add_argument("--what", nargs="+", choices=("step", "latency"), default=["step", "latency"],
                   help="what to time (default: both)")
    p.add_argument("--input-size", type=_size, metavar="CxHxW", help="input shape without the batch; default: "
                   "a checkpoint's data (1x28x28 for Fashion-MNIST, the --input-size of imagefolder), an example "
                   "network's own, else "
                   f"{'x'.join(map(str, BENCH_SIZE))}")
    p.add_argument("--batch", type=_at_least(1), default=16, help="batch of the training step (default: 16; "
                   "latency is always batch 1)")
    p.add_argument("--rounds", type=_at_least(1), default=20, help="timed rounds (default: 20)")
    p.add_argument("--warmup", type=_at_least(0), default=3, help="untimed runs of each variant before the "
                   "rounds (default: 3)")
    p.add_argument("--bits", type=_bits, default=(8, 8), metavar="W/A", help="weight/activation bits of the RepQ "
                   "models (default: 8/8)")
    p.add_argument("--ckpt", metavar="CKPT", help="latency: the int8 model of this quantized `repq-fx train` "
                   "checkpoint (loaded as `repq-fx export` does) instead of MODEL calibrated on random data")
    p.add_argument("--threads", type=_at_least(1), help="torch CPU threads and ONNX Runtime intra-op threads "
                   "(default: torch's choice, for both)")
    p.add_argument("--compile", action="store_true", help="step: also time each variant compiled with "
                   "repq_fx.compile (inductor; compiling takes minutes for a timm model, printed apart)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _add_capture_option(p)
    p.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    if args.ckpt and "latency" not in args.what:
        raise RepQError("--ckpt is only timed by --what latency; add latency to --what")
    if "latency" in args.what:
        for module in ("onnx", "onnxruntime", "onnxscript"):
            try:
                __import__(module)
            except ImportError:
                raise RepQError(f"--what latency needs {module}: pip install 'repq_fx[onnx]' "
                                "(or time the training step only: --what step)") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    qmodel, saved = _restore_quantized(args.ckpt, args.model, "bench") if args.ckpt else (None, None)
    size = args.input_size or (_data_size(saved) if saved else _example_size(args.model) or BENCH_SIZE)
    out = _probe(model, size)

    def head(bits: tuple[int, int]) -> str:
        return (f"{args.model}, input {'x'.join(map(str, size))}, W{bits[0]}A{bits[1]}, {torch.get_num_threads()} "
                f"threads; median of {_plural(args.rounds, 'round')} after {_plural(args.warmup, 'warm-up run')} "
                "of each")

    if "step" in args.what:
        times, compile_seconds = _step_times(model, size, out, args)
        print(f"QAT training step, batch {args.batch}: {head(args.bits)}")
        print(_timing_table(times, "variant"))
        if compile_seconds:
            print("compiling (the first step, untimed): " + ", ".join(
                f"{name} {seconds:.1f} s" for name, seconds in compile_seconds.items()))
    if "latency" in args.what:
        times, ops = _latency_times(model, qmodel, size, args)
        print(f"ONNX Runtime latency, batch 1, {LATENCY_RUNS} runs per round: "
              f"{head(tuple(saved.bits) if saved else args.bits)}")
        print(_timing_table(times, "model"))
        print(f"int8 model as ONNX Runtime runs it: {ops.get('QLinearConv', 0)} QLinearConv, "
              f"{ops.get('QGemm', 0)} QGemm, {ops.get('Conv', 0)} float Conv")
    return 0


def _probe(model: nn.Module, size: tuple[int, ...]) -> torch.Tensor:
    """The eval-mode output of ``model`` on 2 random inputs of ``size``; a clear error if it cannot run them."""
    x = torch.randn(2, *size)
    with torch.no_grad():
        try:
            return model.eval()(x)
        except Exception as e:
            raise RepQError(f"running the model on a {'x'.join(map(str, x.shape))} input failed "
                            f"({type(e).__name__}: {e}); pass the input shape it takes with --input-size CxHxW"
                            ) from None


def _step_times(model: nn.Module, size: tuple[int, ...], out: torch.Tensor,
                args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of each training step of each :data:`BENCH_VARIANTS` model, round robin; with
    ``--compile`` also of each one's ``repq_fx.compile`` twin (``"NAME (compiled)"``), whose first
    step (the compilation) is timed apart: returns the step times and those compile seconds."""
    from ..bench import TrainStep
    from ...compiling import compile as compile_model

    x = torch.randn(args.batch, *size)
    if out.dim() == 2:
        target, loss = torch.randint(0, out.shape[1], (args.batch,)), nn.functional.cross_entropy
    else:
        target, loss = torch.randn(args.batch, *out.shape[1:]), nn.functional.mse_loss
    w, a = args.bits
    steps = {}
    with _progress(len(BENCH_VARIANTS), "prepare", "model", args.progress) as tick:
        for name, bn_mode in BENCH_VARIANTS.items():
            if bn_mode is None:
                module = copy.deepcopy(model)
            else:
                module = _calibrated(model, QConfig(weight_bits=w, act_bits=a, bn_mode=bn_mode), size, 2,
                                     args.batch, (x[:2],), args.capture)
            steps[name] = TrainStep(module.train(), x, target, loss=loss)
            tick()
    compile_seconds: dict[str, float] = {}
    if getattr(args, "compile", False):
        with _progress(len(BENCH_VARIANTS), "compile", "model", args.progress) as tick:
            for name in BENCH_VARIANTS:
                twin = copy.deepcopy(steps[name].module)
                step = TrainStep(compile_model(twin), x, target, loss=loss)
                start = time.perf_counter()
                try:
                    step()
                except Exception as e:
                    raise RepQError(f"compiling {name} failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                    "time it uncompiled (without --compile)") from None
                compile_seconds[f"{name} (compiled)"] = time.perf_counter() - start
                steps[f"{name} (compiled)"] = step
                tick()
    return _round_robin(steps, args, 1, "training step"), compile_seconds


def _latency_times(model: nn.Module, qmodel: nn.Module | None, size: tuple[int, ...],
                   args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds of each batch-1 ONNX Runtime run of the float and int8 models, and the int8 model's fused ops."""
    import tempfile

    import repq_fx

    from ...export.float_onnx import export_float
    from ...export.runtime import optimized_ops, session

    example = (torch.randn(1, *size),)
    with tempfile.TemporaryDirectory(prefix="repq_bench_") as tmp:
        float_path, int8_path = f"{tmp}/float.onnx", f"{tmp}/int8.onnx"
        with _progress(2, "export", "model", args.progress) as tick:
            export_float(merge(model, example, capture=args.capture), example, float_path)
            tick()
            if qmodel is None:
                w, a = args.bits
                qmodel = _calibrated(model, QConfig(weight_bits=w, act_bits=a), size, 4, 4, example, args.capture)
            repq_fx.export_onnx(repq_fx.lower(qmodel), example, int8_path)
            tick()
        threads = torch.get_num_threads()
        feed = {"input": example[0].numpy()}
        runners = {"float (merged)": functools.partial(session(float_path, threads).run, None, feed),
                   "int8 QDQ": functools.partial(session(int8_path, threads).run, None, feed)}
        return _round_robin(runners, args, LATENCY_RUNS, "latency"), dict(optimized_ops(int8_path))


def _round_robin(runners: dict[str, Callable[[], object]], args: argparse.Namespace, repeat: int,
                 what: str) -> dict[str, list[float]]:
    """:func:`repq_fx.app.bench.round_robin` with ``--rounds``/``--warmup``, a progress bar, and clear errors."""
    from ..bench import round_robin

    with _progress(args.rounds, what, "round", args.progress) as tick:
        try:
            return round_robin(runners, args.rounds, warmup=args.warmup, repeat=repeat,
                               on_round=lambda *_: tick())
        except Exception as e:
            raise RepQError(f"timing the {what} failed ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def _progress(total: int, desc: str, unit: str, enabled: bool) -> Iterator[Callable[[], object]]:
    """A tqdm bar on stderr (none without tqdm or when not ``enabled``); yields its tick."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the dev extra
        yield lambda: None
        return
    with tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False) as bar:
        yield bar.update


def _timing_table(times: dict[str, list[float]], first: str) -> str:
    """Median, IQR and ratio of medians to the first entry (float), one row per entry."""
    from ..bench import summarize

    stats = {name: summarize(t, method="inclusive") for name, t in times.items()}
    base = next(iter(stats.values()))
    rows = [(name, _ms(s.median), f"{_ms(s.q1)}-{_ms(s.q3)}", f"{s.ratio(base):.2f}x") for name, s in stats.items()]
    return _table((first, "median (ms)", "IQR (ms)", "ratio to float"), rows)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.3f}"
