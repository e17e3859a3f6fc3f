"""``repq-fx train`` and ``eval``: a run on real data written to a checkpoint every epoch (one process or
``torchrun``), and a checkpoint's test accuracy or PSNR.

>>> _default_data("examples:ECBSR"), _default_data("timm:repvgg_a0")
('sr', 'fashion-mnist')
"""
from __future__ import annotations

import argparse
import sys

import torch

from ...errors import RepQError
from .options import EPILOG, _add_runtime_options, _add_target_option, _at_least, _bits, _data, _image_size


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


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    from ..data.kinds import DATA_FORMS
    from ..train import METHODS

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
    from ..data.kinds import DATA_FORMS

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


def _default_data(model: str) -> str:
    from ..networks import NETWORKS

    prefix, _, name = model.partition(":")
    if prefix == "examples" and name in NETWORKS and NETWORKS[name].task == "sr":
        return "sr"
    return "fashion-mnist"


def _train(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, run_training

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
    from ..distributed import session

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
    from ..train import run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = run_eval(args.ckpt, args.model, args.data, device=args.device, progress=args.progress,
                       test_subset=args.test_subset, workers=args.workers)
    text = f"PSNR {metrics['psnr']:.2f} dB (Y)" if "psnr" in metrics else f"top-1 {metrics['top1']:.2f} %"
    print(f"{args.model} {args.ckpt}: {text}")
    return 0
