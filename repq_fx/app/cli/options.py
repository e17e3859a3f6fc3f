"""What the commands share: the help epilog, argparse types of their arguments, the options several take,
and plain-text tables.

>>> _size("1x28x28"), _bits("W4A8")
((1, 28, 28), (4, 8))
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from ...capture import FRONT_ENDS
from ...errors import RepQError
from ...targets import DEFAULT_TARGET
from ..models import SPEC_FORMS


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


def _add_target_option(p: argparse.ArgumentParser, when: str, default: str | None = DEFAULT_TARGET) -> None:
    from ...targets import TARGETS

    lines = "; ".join(f"{t.name}: exact on {t.exact_on}" for t in TARGETS.values())
    p.add_argument("--target", choices=sorted(TARGETS), default=default,
                   help=f"{when}the runtime whose integer scheme is trained (default: {DEFAULT_TARGET}; "
                   f"a checkpoint's own with --ckpt). {lines}")


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
    from ..train import parse_bits

    try:
        return parse_bits(text)
    except RepQError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _data(text: str) -> str:
    """An argparse ``type``: a ``--data`` value (:func:`repq_fx.app.data.kinds.parse_data`).

    >>> _data("imagefolder:pets")
    'imagefolder:pets'
    """
    from ..data.kinds import parse_data

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
