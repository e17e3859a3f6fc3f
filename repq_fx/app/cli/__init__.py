"""The ``repq-fx`` command line: ``explain``, ``merge``, ``demo``, ``timm-check``, ``train``, ``eval``, ``export``,
``bench``.

Models are named by spec strings (``timm:repvgg_a0``, ``examples:RepVGGNet``, ...),
see :mod:`repq_fx.app.models`. Errors about the user's input are one line on stderr
and exit status 2; a failed ``--check`` or demo exits with 1.

One module per group of commands: :mod:`~repq_fx.app.cli.merging` (explain, merge, timm-check),
:mod:`~repq_fx.app.cli.deploying` (demo, export), :mod:`~repq_fx.app.cli.training` (train, eval) and
:mod:`~repq_fx.app.cli.benchmarking` (bench); :mod:`~repq_fx.app.cli.options` and
:mod:`~repq_fx.app.cli.common` hold what they share.

>>> main(["merge", "examples:RepVGGNet", "--input-size", "1x28x28"])
examples:RepVGGNet: 9 of 9 blocks merged, convs 18 -> 9
0
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ...errors import RepQError
from .benchmarking import _add_bench_parser
from .deploying import _add_demo_parser, _add_export_parser
from .merging import _add_explain_parser, _add_merge_parser, _add_timm_check_parser
from .options import EPILOG
from .training import _add_eval_parser, _add_train_parser

__all__ = ["main"]

# the commands, in the order `repq-fx --help` lists them
COMMANDS = (_add_explain_parser, _add_merge_parser, _add_demo_parser, _add_timm_check_parser, _add_export_parser,
            _add_train_parser, _add_eval_parser, _add_bench_parser)


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
    for add in COMMANDS:
        add(commands)
    return parser
