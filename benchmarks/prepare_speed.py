"""Prepare speed: the stages of the QAT path on large timm models.

For each timm model (float32, random weights, ``pretrained=False``) it times, in one process:

- ``capture``: ``repq_fx.capture.capture(model)`` (trace and canonicalize a deep copy);
- ``explain``: ``repq_fx.explain(model)``;
- ``prepare``: ``repq_fx.prepare(model)`` (default ``QConfig``);
- ``calibrate``: ``repq_fx.calibrate(qmodel, [x])`` with one batch ``x`` of ``--batch`` images at
  ``--size`` (activation ranges, and the MSE search of every weight step).

Each stage runs ``--repeats`` times, the stages interleaved so that machine noise hits them
alike; the table shows medians of wall-clock seconds (and, in brackets, of process CPU seconds:
less sensitive to other jobs on a shared machine than wall time, but it counts every thread).
``prepare + calibrate`` is the median of the per-run sums. Prints a markdown table; writes nothing.

    python benchmarks/prepare_speed.py                        # repvgg_a0 repvgg_d2se mobileone_s0 fastvit_t8
    python benchmarks/prepare_speed.py --models repvgg_d2se --repeats 3 --threads 1
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

import repq_fx
from repq_fx.capture import capture

MODELS = ("repvgg_a0", "repvgg_d2se", "mobileone_s0", "fastvit_t8")
STAGES = ("capture", "explain", "prepare", "calibrate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="timm model names")
    parser.add_argument("--size", type=int, default=64, help="spatial size of the calibration batch")
    parser.add_argument("--batch", type=int, default=2, help="images in the calibration batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; float32; calibration batch "
          f"{args.batch}x3x{args.size}x{args.size}; medians of {args.repeats} runs, wall s (CPU s)\n")
    rows = [bench(name, args.size, args.batch, args.repeats) for name in args.models]
    print(markdown(rows))


def _timed(call: Callable[[], object]) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench(name: str, size: int, batch: int, repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    x = torch.randn(batch, 3, size, size)
    wall: dict[str, list[float]] = {k: [] for k in (*STAGES, "prepare + calibrate")}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    blocks = 0
    for _ in range(repeats):
        _, w, c = _timed(lambda: capture(model))
        wall["capture"].append(w), cpu["capture"].append(c)
        report, w, c = _timed(lambda: repq_fx.explain(model))
        wall["explain"].append(w), cpu["explain"].append(c)
        blocks = len(report.blocks)
        qmodel, w, c = _timed(lambda: repq_fx.prepare(model))
        wall["prepare"].append(w), cpu["prepare"].append(c)
        _, w2, c2 = _timed(lambda: repq_fx.calibrate(qmodel, [x]))
        wall["calibrate"].append(w2), cpu["calibrate"].append(c2)
        wall["prepare + calibrate"].append(w + w2), cpu["prepare + calibrate"].append(c + c2)
        del qmodel
    row: dict[str, object] = {"model": name, "blocks": blocks}
    row.update({k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in wall})
    return row


def markdown(rows: list[dict[str, object]]) -> str:
    keys = (*STAGES, "prepare + calibrate")
    lines = ["| model | blocks | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for r in rows:
        cells = [f"{r[k][0]:.2f} ({r[k][1]:.2f})" for k in keys]  # type: ignore[index]
        lines.append(f"| {r['model']} | {r['blocks']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
