"""``repq-fx demo`` (the whole job on Fashion-MNIST) and ``export`` (a quantized model lowered to int8
and written for a runtime, checked in it).

>>> "--check" in EXPORT_DESCRIPTION
True
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.fx as fx

from ...config import QConfig
from ...errors import RepQError
from ...targets import DEFAULT_TARGET
from ..models import resolve_model
from .common import _calibrated, _data_size, _default_size, _example_size, _restore_quantized
from .options import EPILOG, _add_runtime_options, _add_target_option, _at_least, _bits, _size


DEMO_DESCRIPTION = """\
The whole job on real data, every figure measured in this run (about 6 minutes on 2 CPU cores):

  1. train the small RepVGG (examples:RepVGGNet, 9 RepVGG blocks) in float on Fashion-MNIST;
  2. RepQ quantization-aware training from that checkpoint (W8A8 RepQ-BN by default);
  3. lower it to one int8 conv per block and export QDQ ONNX;
  4. run the int8 file in ONNX Runtime on the 10,000 test images: accuracy, agreement with the
     lowered PyTorch model, ONNX Runtime's fused ops, and latency next to the float model.

Finished steps in --workdir are reused (--fresh retrains). Needs Fashion-MNIST (`make data`).
"""


EXPORT_DESCRIPTION = """\
Lower a quantized model to one int8 conv per block (`repq_fx.lower`) and write it for a runtime:

  .onnx  QDQ ONNX (`repq_fx.export_onnx`): int8 per-channel weights, int32 biases, 8-bit activations,
         which ONNX Runtime fuses into QLinearConv (and TensorRT reads, with --target tensorrt)
  .pte   an ExecuTorch program whose int8 convs XNNPACK runs (static input shape, batch 1)
  .xml   OpenVINO IR (the .bin beside it; converted from a QDQ ONNX written to a temporary folder)

  repq-fx export examples:RepVGGNet --ckpt w8a8.pt --out repvgg_int8.onnx --check
  repq-fx export examples:RepVGGNet --ckpt w8a8.pt --out repvgg_int8.pte --check
  repq-fx export timm:repvgg_a0 --out repvgg_a0_int8.xml      (random calibration: latency only)

--check runs the file in its runtime next to the lowered PyTorch model.
"""


def _add_demo_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help="the whole job on Fashion-MNIST: float training, RepQ QAT, int8 ONNX Runtime",
                            description=DEMO_DESCRIPTION, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp-epochs", type=_at_least(0), default=4, help="float training epochs (default: 4)")
    p.add_argument("--qat-epochs", type=_at_least(0), default=1, help="RepQ QAT epochs (default: 1)")
    p.add_argument("--method", choices=("repq-bn", "repq-bnest"), default="repq-bn", help="RepQ variant "
                   "(default: repq-bn)")
    p.add_argument("--bits", type=_bits, default=(8, 8), metavar="W/A", help="weight/activation bits (default: 8/8)")
    p.add_argument("--subset", type=_at_least(1), metavar="N", help="train on N images only (quick runs)")
    p.add_argument("--test-subset", type=_at_least(1), metavar="N", help="test on the first N images only")
    p.add_argument("--workdir", default=".demo", help="checkpoints and ONNX files (default: .demo)")
    p.add_argument("--fresh", action="store_true", help="retrain even if --workdir holds finished runs")
    _add_runtime_options(p)
    p.set_defaults(run=_demo)


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export", help="lower a RepQ model to one int8 conv per block and write QDQ ONNX",
                            description=EXPORT_DESCRIPTION, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model spec, e.g. examples:RepVGGNet or timm:repvgg_a0")
    p.add_argument("--ckpt", metavar="CKPT", help="a quantized checkpoint written by `repq-fx train` "
                   "(repq-bn, repq-bnest, lsq or ptq); without it, MODEL is prepared and calibrated on random data")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write: .onnx (ONNX Runtime, TensorRT), "
                   ".pte (ExecuTorch with XNNPACK) or .xml (OpenVINO IR, with the .bin beside it)")
    p.add_argument("--format", choices=("onnx", "pte", "openvino"), help="the file format (default: from the "
                   "suffix of --out)")
    p.add_argument("--input-size", type=_size, metavar="CxHxW", help="input shape (batch is dynamic); default: "
                   "a checkpoint's data (1x28x28 for Fashion-MNIST, the --input-size of imagefolder), the timm "
                   "model's own, else 3x224x224")
    p.add_argument("--bits", type=_bits, default=(8, 8), metavar="W/A", help="without --ckpt: weight/activation "
                   "bits (default: 8/8)")
    p.add_argument("--calib-batches", type=_at_least(1), default=4, help="without --ckpt: random calibration "
                   "batches")
    _add_target_option(p, "without --ckpt: ", default=None)
    p.add_argument("--check", action="store_true", help="run the file in its runtime (ONNX Runtime, ExecuTorch, "
                   "OpenVINO) next to the lowered PyTorch model, layer by layer where the runtime allows; exit 1 "
                   "unless 99.9 %% of the outputs are within one quantization step")
    p.set_defaults(run=_export)


def _demo(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    config = DemoConfig(fp_epochs=args.fp_epochs, qat_epochs=args.qat_epochs, bits=args.bits, method=args.method,
                        subset=args.subset, test_subset=args.test_subset, workdir=args.workdir,
                        resume=not args.fresh)
    run_demo(config, progress=args.progress)
    return 0


def _export(args: argparse.Namespace) -> int:
    import repq_fx
    from ...export.formats import format_for

    fmt = format_for(args.out, args.format)
    if not fmt.available:
        raise RepQError(f"--format {fmt.name} needs {fmt.runtime} (pip install {fmt.package}, or `make setup`)")
    if args.ckpt:
        qmodel, saved = _restore_quantized(args.ckpt, args.model, "export")
        size = args.input_size or _data_size(saved)
    else:
        model = resolve_model(args.model).eval()
        size = args.input_size or _example_size(args.model) or _default_size(model)
        w, a = args.bits
        qmodel = _calibrated(model, QConfig(weight_bits=w, act_bits=a, target=args.target or DEFAULT_TARGET), size,
                             args.calib_batches)
        print(f"note: {args.model} calibrated on {args.calib_batches} random batches (no --ckpt): the file is right "
              "for latency and structure, not for accuracy")
    lowered = repq_fx.lower(qmodel)
    described = fmt.write(lowered, torch.randn(1, *size), args.out, args.target)
    print(f"wrote {args.out}: {lowered.lowered_layers} int8 layers, input 1x{'x'.join(map(str, size))}; {described}")
    if args.check:
        return _check_file(args.out, lowered, torch.randn(8, *size), args.target, fmt.name)
    return 0


def _check_file(path: str, lowered: fx.GraphModule, x: torch.Tensor, target: str | None = None,
                fmt: str | None = None) -> int:
    """Run the file in its runtime against the lowered model on ``x`` (:mod:`repq_fx.export.formats`): 0 when
    it passes, else 1 with the reason on stderr."""
    from ...errors import ExportCheckError
    from ...export.formats import format_for

    try:
        print(format_for(path, fmt).check(path, lowered, x, target))
    except ExportCheckError as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 1
    return 0
