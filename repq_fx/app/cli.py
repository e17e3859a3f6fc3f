"""The ``repq-fx`` command line: ``explain``, ``merge``, ``demo``, ``timm-check``, ``train``, ``eval``, ``export``,
``bench``.

Models are named by spec strings (``timm:repvgg_a0``, ``examples:RepVGGNet``, ...),
see :mod:`repq_fx.app.models`. Errors about the user's input are one line on stderr
and exit status 2; a failed ``--check`` or demo exits with 1.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn as nn

from .. import explain, merge
from ..capture import FRONT_ENDS
from ..config import QConfig
from ..errors import RepQError
from .models import SPEC_FORMS, resolve_model
from ..targets import DEFAULT_TARGET

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = ["main"]

REL_TOL = 1e-9  # the float64 exactness target of merge (docs/design.md)
DEMO_MODELS = ("repvgg_a0", "mobileone_s0", "fastvit_t8")
CALIBRATION_SHAPE = (4, 3, 64, 64)  # small: float64 train-mode forwards of multi-branch nets are slow

EPILOG = f"""\
model specs: {SPEC_FORMS}
  (all built without arguments; timm and torchvision with random weights, nothing is downloaded)

examples:
  repq-fx demo                                    float -> RepQ QAT -> int8 ONNX Runtime on Fashion-MNIST
  repq-fx timm-check                              merge three timm models, compare with timm's own
  repq-fx explain timm:mobileone_s0               which blocks merge into one conv, and why not
  repq-fx explain examples:RepVGGNet --input-size 1x28x28
  repq-fx merge timm:fastvit_t8 --check           float64 check against the model and timm
  repq-fx merge mypkg.nets:MyNet --out merged.pt  save the merged torch.fx.GraphModule
  repq-fx train examples:RepVGGNet --epochs 10 --out fp.pt                     float training
  repq-fx train examples:RepVGGNet --method repq-bn --bits 4/4 --from fp.pt --epochs 2 --out w4a4.pt
  repq-fx eval examples:RepVGGNet --ckpt w4a4.pt
  repq-fx export examples:RepVGGNet --ckpt w4a4.pt --out w4a4.onnx --check
  repq-fx bench timm:repvgg_a0 --threads 2        QAT step float vs RepQ-BN/BNEst; int8 vs float ONNX latency
  repq-fx bench examples:RepVGGNet --what latency --ckpt w4a4.pt
  repq-fx explain mypkg.nets:MyNet --capture export   torch.export for models FX tracing cannot follow

`repq-fx COMMAND --help` shows the options of each command.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except RepQError as e:
        print(f"repq-fx: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repq-fx", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Find the re-parametrized blocks of any PyTorch model (RepVGG, MobileOne, FastViT, DBB, ...) "
                    "and merge each into one conv, with no per-architecture code; train such models with "
                    "RepQ quantization-aware training on real data.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    p = commands.add_parser("explain", help="print every block, its branches, and why it is not merged",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model spec, e.g. timm:repvgg_a0")
    p.add_argument("--input-size", type=_size, metavar="CxHxW", help="example input shape (batch 1) for shape "
                   "propagation, e.g. 3x224x224; default: none, trace only")
    _add_capture_option(p)
    p.set_defaults(run=_explain)

    p = commands.add_parser("merge", help="merge every block into one conv; check and save the result",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model spec, e.g. timm:repvgg_a0")
    p.add_argument("--input-size", type=_size, metavar="CxHxW", help="input shape for --check (and shape "
                   "propagation); default: the timm model's own, else 3x224x224")
    p.add_argument("--check", action="store_true", help="compare the merged model's float64 output with the "
                   f"original's (and timm's reparameterize_model for timm models); fail above {REL_TOL:g}")
    p.add_argument("--out", metavar="FILE", help="torch.save the merged GraphModule to FILE")
    _add_capture_option(p)
    p.set_defaults(run=_merge)

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

    p = commands.add_parser("timm-check", help="merge timm models and compare with timm's own merge (float64)",
                            description="Build each timm model with random weights in float64, calibrate its BN "
                            "statistics on random data, merge it with repq_fx and with timm's "
                            "reparameterize_model, and compare outputs, conv counts and times.")
    p.add_argument("--models", nargs="+", default=DEMO_MODELS, metavar="NAME", help="timm model names "
                   f"(default: {' '.join(DEMO_MODELS)})")
    p.set_defaults(run=_timm_check)

    p = commands.add_parser("export", help="lower a RepQ model to one int8 conv per block and write QDQ ONNX",
                            description=EXPORT_DESCRIPTION, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model spec, e.g. examples:RepVGGNet or timm:repvgg_a0")
    p.add_argument("--ckpt", metavar="CKPT", help="a quantized checkpoint written by `repq-fx train` "
                   "(repq-bn, repq-bnest, lsq or ptq); without it, MODEL is prepared and calibrated on random data")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write: .onnx (ONNX Runtime, TensorRT), "
                   ".pte (ExecuTorch with XNNPACK) or .xml (OpenVINO IR, with the .bin and the .onnx beside it)")
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
    _add_train_parser(commands)
    _add_eval_parser(commands)
    _add_bench_parser(commands)
    return parser


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
  .xml   OpenVINO IR (the .bin and the QDQ .onnx it was converted from are written beside it)

  repq-fx export examples:RepVGGNet --ckpt w8a8.pt --out repvgg_int8.onnx --check
  repq-fx export examples:RepVGGNet --ckpt w8a8.pt --out repvgg_int8.pte --check
  repq-fx export timm:repvgg_a0 --out repvgg_a0_int8.xml      (random calibration: latency only)

--check runs the file in its runtime next to the lowered PyTorch model.
"""

TRAIN_DESCRIPTION = """\
Train MODEL on real data, in float or with quantization-aware training, and write a checkpoint
after every epoch (atomically: a crash never leaves half a file).

The usual path is two runs: a float (fp) run, then a quantized run that starts from it:

  repq-fx train examples:RepVGGNet --epochs 10 --out fp.pt
  repq-fx train examples:RepVGGNet --method repq-bn --bits 4/4 --from fp.pt --epochs 2 --out w4a4.pt

Methods (--method):
  fp          float training (no quantization)
  repq-bn     RepQ: fake quant on each block's merged weight M(theta), BN inside blocks with exact
              batch statistics; the trained model lowers to one int conv per block
  repq-bnest  RepQ with BN statistics estimated from the block input's moments (no branch convs)
  lsq         baseline: merge the blocks first (BN folded), then LSQ quantization-aware training
  ptq         baseline: merge, then min-max post-training quantization (calibration only, no training)
Quantized methods calibrate activation ranges on --calib-batches training batches first; the first
and last layers stay at 8 bits.

Data (--data):
  fashion-mnist  Fashion-MNIST from Debian's dataset-fashion-mnist (`make data` installs it); 28x28 grey
                 images normalised with mean 0.2860, std 0.3530; random crop (pad 2) and horizontal flip
  sr             x2 super-resolution on the Y channel from the photographs in scikit-image; --subset is the
                 number of random training patches per epoch (default 4000); PSNR on Y, border cropped
  imagefolder:DIR  your own images, torchvision's ImageFolder layout: DIR/train/CLASS/IMAGE and
                 DIR/val/CLASS/IMAGE; the classes are the folders of train/. Images are read at --input-size
                 (default 3x224x224; 1xHxW reads them grey); train: RandomResizedCrop + horizontal flip,
                 val: resize to size/0.875 + centre crop; normalised with ImageNet's mean and std. timm,
                 torchvision and example network specs are built with the data's classes (and timm's with
                 its channels)
  srfolder:DIR   your own photographs for super-resolution: DIR/train/IMAGE and DIR/val/IMAGE, degraded and
                 patched exactly as sr
Default: sr for examples:ECBSR, else fashion-mnist. --workers N reads image files in N processes; a
corrupt image stops the run with one line naming it.

  repq-fx train timm:repvgg_a0 --data imagefolder:pets --input-size 3x128x128 --workers 4 --out fp.pt

Schedule: SGD, momentum 0.9, cosine learning rate per step down to 0; weight decay only on conv and
linear weights. Defaults by data and method: Fashion-MNIST fp lr 0.05, weight decay 1e-4, batch 128;
quantized lr 0.01, no weight decay; SR: Adam lr 5e-4 (fp) / 1e-4 (quantized), batch 16.

Interrupted? Rerun the same command with --resume: it continues after the last finished epoch and
ends with the same weights as an uninterrupted run.

Many processes: `torchrun --nproc-per-node N -m repq_fx train ...` trains with DistributedDataParallel
(gloo on the CPU, nccl with --device cuda, one GPU per process). --batch-size is per process (the global
batch is N times it); rank 0 logs and writes the checkpoint; --resume needs the same N.
"""


def _add_target_option(p: argparse.ArgumentParser, when: str, default: str | None = DEFAULT_TARGET) -> None:
    from ..targets import TARGETS

    lines = "; ".join(f"{t.name}: exact on {t.exact_on}" for t in TARGETS.values())
    p.add_argument("--target", choices=sorted(TARGETS), default=default,
                   help=f"{when}the runtime whose integer scheme is trained (default: {DEFAULT_TARGET}; "
                   f"a checkpoint's own with --ckpt). {lines}")


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    from .data.kinds import DATA_FORMS
    from .train import METHODS

    p = commands.add_parser("train", help="train a model (float, RepQ QAT or a baseline) on Fashion-MNIST, SR or "
                            "your own images",
                            description=TRAIN_DESCRIPTION, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model spec, e.g. examples:RepVGGNet, examples:ACResNet18, "
                   "examples:ECBSR, timm:repvgg_a0")
    p.add_argument("--data", type=_data, metavar="DATA", help=f"{DATA_FORMS} (default: sr for examples:ECBSR, "
                   "else fashion-mnist; see above)")
    p.add_argument("--input-size", type=_image_size, metavar="CxHxW", help="imagefolder: the model's input, "
                   "e.g. 3x128x128, 1x64x64 (grey) or 128 (= 3x128x128); default 3x224x224")
    p.add_argument("--workers", type=_at_least(0), default=0, help="DataLoader worker processes reading the "
                   "images (default: 0, read in the main process; not for fashion-mnist)")
    p.add_argument("--method", choices=METHODS, default="fp", help="how to train (default: fp; see above)")
    p.add_argument("--bits", type=_bits, metavar="W/A", help="weight/activation bits of quantized methods, e.g. "
                   "4/4, 8/4 or W4A8 (default: 8/8; refused with --method fp)")
    p.add_argument("--epochs", type=_at_least(0), default=10, help="epochs (default: 10; ptq ignores it)")
    p.add_argument("--subset", type=_at_least(1), metavar="N", help="train on a fixed random N images "
                   "(fashion-mnist, imagefolder) or N patches per epoch (sr, srfolder), for quick runs")
    p.add_argument("--test-subset", type=_at_least(1), metavar="N", help="evaluate on the first N test images "
                   "only")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file, rewritten after every epoch")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same command line)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out instead of refusing")
    p.add_argument("--from", dest="from_ckpt", metavar="FP_CKPT", help="start from this float (fp) checkpoint of "
                   "the same MODEL; what quantized methods should start from")
    p.add_argument("--lr", type=float, help="initial learning rate (default: by data and method, see above)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default: by data and method)")
    p.add_argument("--batch-size", type=_at_least(1), help="batch size (default: 128 fashion-mnist, 16 sr)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="default: sgd for fashion-mnist, adam for sr")
    p.add_argument("--step-lr-scale", type=float, help="learning rate of the LSQ steps relative to --lr "
                   "(default: 1 with sgd, 0.01 with adam)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
    _add_target_option(p, "quantized methods: ")
    p.add_argument("--calib-batches", type=_at_least(1), default=8, help="training batches that set activation "
                   "ranges before quantized training (default: 8)")
    p.add_argument("--compile", action="store_true", help="train the model compiled with repq_fx.compile "
                   "(torch.compile, inductor): faster steps after a compilation of seconds to minutes; "
                   "evaluation and checkpoints use the same weights, uncompiled")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision: forward under torch.autocast in "
                   "this dtype (fp16 with a GradScaler); fake quantizers and merged weights stay float32")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: BN statistics of the global batch "
                   "(torch.nn.SyncBatchNorm; RepQ's in-block BNs too); --method fp needs --device cuda")
    _add_runtime_options(p)
    p.set_defaults(run=_train)


def _add_eval_parser(commands: argparse._SubParsersAction) -> None:
    from .data.kinds import DATA_FORMS

    p = commands.add_parser("eval", help="evaluate a checkpoint written by `repq-fx train` on its test set",
                            description="Rebuild the model a `repq-fx train` checkpoint holds (float, RepQ or a "
                            "quantized baseline, as trained), load it, and print its test accuracy "
                            "(fashion-mnist: top-1 on the 10,000 test images; imagefolder: top-1 on val/) or PSNR "
                            "(sr: Y channel, scikit-image test photographs; srfolder: val/).\n\n"
                            "  repq-fx eval examples:RepVGGNet --ckpt w4a4.pt\n"
                            "  repq-fx eval timm:repvgg_a0 --ckpt pets.pt --data imagefolder:pets --workers 4",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model spec the checkpoint was trained for (checked)")
    p.add_argument("--data", type=_data, metavar="DATA", help=f"{DATA_FORMS}: the checkpoint's own (the default), "
                   "or another folder of the same kind (imagefolder: evaluated on its val/)")
    p.add_argument("--workers", type=_at_least(0), default=0, help="DataLoader worker processes reading the "
                   "images (default: 0)")
    p.add_argument("--ckpt", required=True, metavar="CKPT", help="checkpoint written by `repq-fx train`")
    p.add_argument("--test-subset", type=_at_least(1), metavar="N", help="evaluate on the first N test images only")
    _add_runtime_options(p)
    p.set_defaults(run=_eval)


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


def _add_capture_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--capture", choices=FRONT_ENDS, default="auto", help="graph capture: fx (symbolic tracing), "
                   "export (torch.export, for models FX tracing cannot follow) or auto (fx, falling back to "
                   "export; default)")


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=_at_least(1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum``.

    >>> _at_least(1)("3")
    3
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
        return value

    return parse


def _bits(text: str) -> tuple[int, int]:
    from .train import parse_bits

    try:
        return parse_bits(text)
    except RepQError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _data(text: str) -> str:
    """An argparse ``type``: a ``--data`` value (:func:`repq_fx.app.data.kinds.parse_data`).

    >>> _data("imagefolder:pets")
    'imagefolder:pets'
    """
    from .data.kinds import parse_data

    try:
        parse_data(text)
    except RepQError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _image_size(text: str) -> tuple[int, ...]:
    """An argparse ``type``: ``CxHxW`` (as :func:`_size`), or one number N for 3xNxN.

    >>> _image_size("64"), _image_size("1x32x48")
    ((3, 64, 64), (1, 32, 48))
    """
    if text.strip().isdigit() and int(text) >= 1:
        return (3, int(text), int(text))
    return _size(text)


def _default_data(model: str) -> str:
    from .networks import NETWORKS

    prefix, _, name = model.partition(":")
    if prefix == "examples" and name in NETWORKS and NETWORKS[name].task == "sr":
        return "sr"
    return "fashion-mnist"


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, run_training

    if args.method == "fp" and args.bits is not None:
        raise RepQError(f"--bits {args.bits[0]}/{args.bits[1]} does nothing with --method fp (float training): "
                        "drop --bits, or pick a quantized method (--method repq-bn, repq-bnest, lsq or ptq)")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(model=args.model, data=args.data or _default_data(args.model), method=args.method,
                         bits=args.bits or (8, 8), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, optimizer=args.optimizer,
                         step_lr_scale=args.step_lr_scale, subset=args.subset,
                         seed=args.seed, calib_batches=args.calib_batches, from_ckpt=args.from_ckpt,
                         test_subset=args.test_subset, target=args.target, input_size=args.input_size,
                         workers=args.workers)
    from .distributed import session

    try:
        with session(args.device) as device:  # torchrun: one process group for the run (repq_fx.app.distributed)
            run_training(config, args.out, resume=args.resume, overwrite=args.overwrite, device=device,
                         progress=args.progress, compile=args.compile, amp=args.amp, sync_bn=args.sync_bn)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {args.out} holds the last finished epoch: rerun with --resume to continue",
              file=sys.stderr)
        return 130
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .train import run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = run_eval(args.ckpt, args.model, args.data, device=args.device, progress=args.progress,
                       test_subset=args.test_subset, workers=args.workers)
    text = f"PSNR {metrics['psnr']:.2f} dB (Y)" if "psnr" in metrics else f"top-1 {metrics['top1']:.2f} %"
    print(f"{args.model} {args.ckpt}: {text}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    model = resolve_model(args.model)
    example = (torch.randn(1, *args.input_size),) if args.input_size else None
    print(explain(model, example, capture=args.capture))
    return 0


def _merge(args: argparse.Namespace) -> int:
    model = resolve_model(args.model).eval()
    example = (torch.randn(1, *args.input_size),) if args.input_size else None
    report = explain(model, example, capture=args.capture)
    merged = merge(model, example, capture=args.capture)
    print(f"{args.model}: {len(report.merged)} of {len(report.blocks)} blocks merged, "
          f"convs {_count_convs(model)} -> {_count_convs(merged)}")
    for b in report.not_merged:
        print(f"  not merged: {b.name or '<root>'}: {b.reason}")
    ok = _check(model, args.input_size or _default_size(model), args.capture) if args.check else True
    if args.out:
        _save(merged, args.out)
    return 0 if ok else 1


def _check(model: nn.Module, size: tuple[int, ...], capture: str = "auto") -> bool:
    """Print the float64 relative errors of ``merge(model)`` (and timm's merge) against ``model``."""
    model = copy.deepcopy(model).double().eval()
    x = torch.randn(2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            want = model(x)
        except Exception as e:
            raise RepQError(f"running the model on a {'x'.join(map(str, x.shape))} input failed "
                            f"({type(e).__name__}: {e}); pass --input-size") from None
        got = merge(model, capture=capture)(x)
        errors = {"original": _rel_error(got, want)}
        if _is_timm(model):
            errors["timm reparameterize_model"] = _rel_error(got, _timm_reparameterize(model)(x))
    ok = all(e <= REL_TOL for e in errors.values())
    print(f"check (float64, input {'x'.join(map(str, x.shape))}): max relative error "
          + ", ".join(f"vs {k} {v:.1e}" for k, v in errors.items()) + (" ok" if ok else f" FAILED (> {REL_TOL:g})"))
    return ok


def _save(merged: fx.GraphModule, path: str) -> None:
    try:
        torch.save(merged, path)
        print(f"saved the merged GraphModule to {path} (load with torch.load({path!r}, weights_only=False))")
    except Exception as e:  # pickling a GraphModule needs every submodule class to be picklable
        torch.save(merged.state_dict(), path)
        print(f"could not pickle the GraphModule ({type(e).__name__}: {e}); saved its state_dict to {path} instead")


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    config = DemoConfig(fp_epochs=args.fp_epochs, qat_epochs=args.qat_epochs, bits=args.bits, method=args.method,
                        subset=args.subset, test_subset=args.test_subset, workdir=args.workdir,
                        resume=not args.fresh)
    run_demo(config, progress=args.progress)
    return 0


def _export(args: argparse.Namespace) -> int:
    import repq_fx
    from ..export.formats import format_for

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


def _restore_quantized(path: str, model: str, command: str) -> tuple[nn.Module, TrainConfig]:
    """The quantized model of a `repq-fx train` checkpoint, and the run's config; a float one is an error."""
    from .train import TrainConfig, restore

    qmodel, ckpt = restore(path, model)
    saved = TrainConfig.from_dict(ckpt["config"])
    if not saved.quantized:
        raise RepQError(f"{path} is a float (fp) checkpoint; {command} needs a quantized one: train it with "
                        f"`repq-fx train {model} --method repq-bn --from {path} --out q.pt` first")
    return qmodel, saved


def _data_size(saved: TrainConfig) -> tuple[int, ...]:
    """The input shape (without the batch) of the model of a `repq-fx train` run: its data's images, with
    as many channels as the model's first conv takes (a torchvision model on Fashion-MNIST: 3)."""
    from .train import model_input_size

    return model_input_size(saved)


def _calibrated(model: nn.Module, config: QConfig, size: tuple[int, ...], batches: int, batch: int = 4,
                example: tuple[torch.Tensor, ...] | None = None, capture: str = "auto") -> fx.GraphModule:
    """``repq_fx.prepare(model, config)``, calibrated on ``batches`` random batches of ``batch`` inputs."""
    import repq_fx

    qmodel = repq_fx.prepare(model, config, example, capture=capture)
    repq_fx.calibrate(qmodel, [torch.randn(batch, *size) for _ in range(batches)])
    return qmodel


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


def _example_size(spec: str) -> tuple[int, ...] | None:
    """The input size an ``examples:NAME`` network registers; None for other specs."""
    from .networks import NETWORKS

    prefix, _, name = spec.partition(":")
    return NETWORKS[name].input_size if prefix == "examples" and name in NETWORKS else None


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
    from .bench import TrainStep
    from ..compiling import compile as compile_model

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

    from ..export.float_onnx import export_float
    from ..export.runtime import optimized_ops, session

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
    from .bench import round_robin

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
    from .bench import summarize

    stats = {name: summarize(t, method="inclusive") for name, t in times.items()}
    base = next(iter(stats.values()))
    rows = [(name, _ms(s.median), f"{_ms(s.q1)}-{_ms(s.q3)}", f"{s.ratio(base):.2f}x") for name, s in stats.items()]
    return _table((first, "median (ms)", "IQR (ms)", "ratio to float"), rows)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.3f}"


def _check_file(path: str, lowered: fx.GraphModule, x: torch.Tensor, target: str | None = None,
                fmt: str | None = None) -> int:
    """Run the file in its runtime against the lowered model on ``x`` (:mod:`repq_fx.export.formats`): 0 when
    it passes, else 1 with the reason on stderr."""
    from ..errors import ExportCheckError
    from ..export.formats import format_for

    try:
        print(format_for(path, fmt).check(path, lowered, x, target))
    except ExportCheckError as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 1
    return 0


def _timm_check(args: argparse.Namespace) -> int:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the dev extra
        def tqdm(items, **_):
            return items

    header = ("model", "blocks merged", "convs (ours)", "convs (timm)", "rel. err vs original",
              "rel. err vs timm", "time ours / timm")
    rows, ok = [], True
    for name in tqdm(args.models, desc="timm-check", unit="model", leave=False):
        model = resolve_model(f"timm:{name}").double()
        _calibrate_bn(model, torch.randn(CALIBRATION_SHAPE, dtype=torch.float64))
        x = torch.randn(1, *_default_size(model), dtype=torch.float64)
        start = time.perf_counter()
        report, merged = explain(model), merge(model)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        theirs = _timm_reparameterize(model)
        timm_s = time.perf_counter() - start
        with torch.no_grad():
            want, got, timm_out = model(x), merged(x), theirs(x)
        err, err_timm = _rel_error(got, want), _rel_error(got, timm_out)
        before, after, after_timm = _count_convs(model), _count_convs(merged), _count_convs(theirs)
        ok &= err <= REL_TOL and err_timm <= REL_TOL and after <= after_timm
        rows.append((name, f"{len(report.merged)}/{len(report.blocks)}", f"{before} -> {after}",
                     f"{before} -> {after_timm}", f"{err:.1e}", f"{err_timm:.1e}", f"{ours:.1f} s / {timm_s:.1f} s"))
    print(_table(header, rows))
    print("float64, random weights, BN statistics from 3 random train-mode batches of "
          f"{'x'.join(map(str, CALIBRATION_SHAPE))}; rel. err = max|a-b| / max|b| on one input of the model's "
          "size; time ours = explain + merge.\n"
          + ("every merge is exact (<= 1e-9) and leaves no more convs than timm's."
             if ok else "SOME MERGES FAILED: see the table."))
    return 0 if ok else 1


def _calibrate_bn(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """Give every BN non-trivial running statistics: cumulative averages over ``steps`` train-mode forwards."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn_like(x))
    model.eval()


def _timm_reparameterize(model: nn.Module) -> nn.Module:
    """timm's own merge, on a copy. Its fuse() builds float32 convs (RepViT), so match the default dtype."""
    from timm.utils.model import reparameterize_model

    dtype = next(model.parameters()).dtype
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return reparameterize_model(model, inplace=False)
    finally:
        torch.set_default_dtype(saved)


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def _default_size(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def _count_convs(model: nn.Module) -> int:
    """Convs a forward runs: graph nodes for a GraphModule, conv modules otherwise."""
    if isinstance(model, fx.GraphModule):
        return sum(1 for n in model.graph.nodes
                   if (n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.modules.conv._ConvNd))
                   or (n.op == "call_function" and n.target in (torch.conv2d, nn.functional.conv2d)))
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _size(text: str) -> tuple[int, ...]:
    """An argparse ``type``: ``CxHxW`` (channels, height, width; no batch) as a tuple of 3 positive ints.

    >>> _size("1x28x28")
    (1, 28, 28)
    >>> _size("28x28")
    Traceback (most recent call last):
      ...
    argparse.ArgumentTypeError: '28x28' is not CxHxW (channels x height x width, without the batch), e.g. 1x28x28 or 3x224x224
    """
    try:
        size = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not CxHxW (channels x height x width, without the batch), "
                                         "e.g. 1x28x28 or 3x224x224")
    return size


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
