"""``repq-fx explain``, ``merge`` and ``timm-check``: which blocks merge, the merged model checked in
float64 against the original (and timm's own merge), saved.

>>> _rel_error(torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0])) < 0.06
True
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.fx as fx
import torch.nn as nn

from ... import explain, merge
from ...errors import RepQError
from ..models import resolve_model
from .common import _default_size
from .options import EPILOG, _add_capture_option, _size, _table


REL_TOL = 1e-9  # the float64 exactness target of merge (docs/design.md)
DEMO_MODELS = ("repvgg_a0", "mobileone_s0", "fastvit_t8")
CALIBRATION_SHAPE = (4, 3, 64, 64)  # small: float64 train-mode forwards of multi-branch nets are slow


def _add_explain_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("explain", help="print every block, its branches, and why it is not merged",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model spec, e.g. timm:repvgg_a0")
    p.add_argument("--input-size", type=_size, metavar="CxHxW", help="example input shape (batch 1) for shape "
                   "propagation, e.g. 3x224x224; default: none, trace only")
    _add_capture_option(p)
    p.set_defaults(run=_explain)


def _add_merge_parser(commands: argparse._SubParsersAction) -> None:
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


def _add_timm_check_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("timm-check", help="merge timm models and compare with timm's own merge (float64)",
                            description="Build each timm model with random weights in float64, calibrate its BN "
                            "statistics on random data, merge it with repq_fx and with timm's "
                            "reparameterize_model, and compare outputs, conv counts and times.")
    p.add_argument("--models", nargs="+", default=DEMO_MODELS, metavar="NAME", help="timm model names "
                   f"(default: {' '.join(DEMO_MODELS)})")
    p.set_defaults(run=_timm_check)


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


def _count_convs(model: nn.Module) -> int:
    """Convs a forward runs: graph nodes for a GraphModule, conv modules otherwise."""
    if isinstance(model, fx.GraphModule):
        return sum(1 for n in model.graph.nodes
                   if (n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.modules.conv._ConvNd))
                   or (n.op == "call_function" and n.target in (torch.conv2d, nn.functional.conv2d)))
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()
