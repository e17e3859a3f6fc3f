"""Merge speed: ``repq_fx.explain`` and ``repq_fx.merge`` against timm's ``reparameterize_model``.

For each timm model (float32, random weights, eval mode) it times, in the same run:

- ``explain(model, example_inputs)``, ``merge(model, example_inputs)``, and the two one after the other
  (``example_inputs``: one image at ``--size``, which adds a shape-propagation forward; or none);
- ``timm.utils.reparameterize_model(model, inplace=False)``, the per-architecture merge timm ships.

Each measurement runs ``--repeats`` times (after ``--warmup`` untimed runs), the four
interleaved so that machine noise hits them alike; the table shows medians and the
ratios ours / timm. Before timing, one merge is checked against timm's (conv counts,
float32 output). Prints a markdown table; writes nothing.

    python benchmarks/merge_speed.py                  # mobileone_s4 and fastvit_sa36 at 224
    python benchmarks/merge_speed.py --models repvgg_b3 --repeats 3
    python benchmarks/merge_speed.py --no-example-inputs   # merge(model): no shape propagation
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import timm
import torch
from timm.utils.model import reparameterize_model

import repq_fx
from repq_fx.app.cli.merging import _count_convs, _rel_error
from repq_fx.app.models import resolve_model

MODELS = ("mobileone_s4", "fastvit_sa36")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="timm model names")
    parser.add_argument("--size", type=int, default=224, help="input resolution of the example input")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-example-inputs", action="store_true",
                        help="call explain/merge without example_inputs (no shape propagation)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = "none" if args.no_example_inputs else f"1x3x{args.size}x{args.size}"

    print(f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; float32, eval, "
          f"example_inputs {inputs}; medians of {args.repeats} (after {args.warmup} warm-up)\n")
    rows = [bench(name, args.size, args.repeats, args.warmup, not args.no_example_inputs) for name in args.models]
    print(markdown(rows))


def bench(name: str, size: int, repeats: int, warmup: int, with_inputs: bool) -> dict[str, object]:
    model = resolve_model(f"timm:{name}").eval()
    x = torch.randn(1, 3, size, size)
    example = (x,) if with_inputs else None
    calls: dict[str, Callable[[], object]] = {
        "explain": lambda: repq_fx.explain(model, example),
        "merge": lambda: repq_fx.merge(model, example),
        "explain + merge": lambda: (repq_fx.explain(model, example), repq_fx.merge(model, example)),
        "timm": lambda: reparameterize_model(model, inplace=False),
    }
    ours, theirs = repq_fx.merge(model, example), reparameterize_model(model, inplace=False)
    with torch.no_grad():
        err = _rel_error(ours(x), theirs(x))
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(warmup + repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    row: dict[str, object] = {k: statistics.median(v) for k, v in times.items()}
    row.update(model=name, convs=f"{_count_convs(model)} -> {_count_convs(ours)} / {_count_convs(theirs)}", err=err)
    return row


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [("| model | convs: before -> ours / timm | rel. err vs timm (fp32) | explain | merge | explain + merge "
              "| timm reparameterize_model | merge / timm | (explain + merge) / timm |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['convs']} | {r['err']:.1e} | {r['explain']:.2f} s | {r['merge']:.2f} s "
                     f"| {r['explain + merge']:.2f} s | {r['timm']:.2f} s | {r['merge'] / r['timm']:.1f}x "
                     f"| {r['explain + merge'] / r['timm']:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
