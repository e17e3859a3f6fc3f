"""Int8 inside PyTorch: ``repq_fx.compile_int8`` (inductor, oneDNN int8 convs) against the float models, CPU.

One ``timm.create_model(name, pretrained=False)`` with BN running statistics set from calibration
images (``deploy_latency.images`` / ``set_bn_statistics``), then side by side in one process:

- ``train-form float``: the timm model as it trains (every branch), eager;
- ``merged float``: timm's ``reparameterize_model`` (one conv per block), eager, and through
  ``torch.compile`` (inductor, default options) for a fair comparison with a compiled model;
- ``lowered eager``: ``prepare`` -> ``calibrate`` (same images) -> ``lower``, run eagerly (it simulates the
  integer arithmetic in float: exact, slow);
- ``lowered compile_int8``: ``repq_fx.compile_int8(lowered)``: each block one ``onednn.qconv_pointwise``.

Each batch size gets its own compiled modules (static shapes). Latency: ``--threads`` intra-op threads,
``--warmup`` untimed runs, then ``--rounds`` rounds in rotating order, ``--runs`` timed runs per variant
per round (``repq_fx.app.bench.round_robin``); medians and their ratios. Agreement of the compiled int8
model with the lowered model on ``--check-images`` other images: output values within one output step
and the same top-1 class.

    .venv/bin/python benchmarks/pytorch_int8.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import time
import warnings
from collections.abc import Sequence

import torch

from deploy_latency import _git, images, machine, set_bn_statistics  # this directory's deployment benchmark
from repq_fx.app.bench import round_robin

warnings.filterwarnings("ignore")


def output_agreement(compiled, lowered, inputs: list[torch.Tensor]) -> tuple[float, float, float]:
    """(fraction of output values within one output step, the largest difference in steps, fraction of
    inputs with the same top-1 class) of ``compiled`` against ``lowered``."""
    from repq_fx.export.parity import output_steps

    step = output_steps(lowered)[0] or 1.0
    diffs, same = [], []
    with torch.no_grad():
        for x in inputs:
            got, ref = compiled(x), lowered(x)
            diffs.append(((got - ref).abs() / step).flatten())
            same.append((got.argmax(-1) == ref.argmax(-1)).float())
    d = torch.cat(diffs)
    return float((d <= 1.001).float().mean()), float(d.max()), float(torch.cat(same).mean())


def layer_agreement(lowered, x: torch.Tensor) -> list[tuple[str, float, float]]:
    """Each quantizer of ``lowered``, computed by ``compile_int8`` from the lowered model's own values at the
    quantizers before it (every stretch between quantizers cut out of the graph, all compiled as one graph):
    ``(quantizer, fraction within one step, max steps)``. Rounding ties amplified through a deep random
    network cannot reach a layer here, as in ``repq_fx.export.parity.segment_parity`` for ONNX Runtime."""
    import repq_fx
    from repq_fx.export.parity import _snapshot_values
    from repq_fx.quant.lowered import QuantizeDequantize

    values = {n.name: v for n, v in _snapshot_values(lowered, (x,)).items()}
    cut = copy.deepcopy(lowered)
    graph = cut.graph
    quantizers = [n for n in graph.nodes if n.op == "call_module"
                  and isinstance(cut.get_submodule(n.target), QuantizeDequantize)]
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    feeds = []
    for q in quantizers:
        users = list(q.users)
        with graph.inserting_after(last):
            last = graph.placeholder(f"{q.name}_value")
        with graph.inserting_after(last):
            fresh = graph.call_module(q.target, (last,))
        for user in users:
            user.replace_input_with(q, fresh)
        feeds.append(values[q.name])
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(quantizers),)
    graph.eliminate_dead_code()
    cut.recompile()
    got = repq_fx.compile_int8(cut, (x, *feeds))(x, *feeds)
    out = []
    for q, g in zip(quantizers, got):
        steps = (g - values[q.name]).abs() / float(cut.get_submodule(q.target).scale)
        out.append((q.target, float((steps <= 1.001).float().mean()), float(steps.max())))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["repvgg_a0"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=4, help="timed runs per variant per round (batch 1)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calib", type=int, default=8, help="calibration images")
    parser.add_argument("--check-images", type=int, default=8, help="other images for the agreement check")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import timm
    from timm.utils import reparameterize_model

    import repq_fx

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, repq_fx {_git()}, torch {torch.__version__}, timm {timm.__version__}")
    print(f"machine: {machine()}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"input {args.size}x{args.size}, threads {args.threads}, {args.rounds} rounds (medians)\n")
    calib = images(args.size, args.calib)
    check = images(args.size, args.check_images, offset=args.calib)
    for name in args.models:
        torch.manual_seed(0)
        model = set_bn_statistics(timm.create_model(name, pretrained=False), calib)
        merged = reparameterize_model(copy.deepcopy(model)).eval()
        qmodel = repq_fx.prepare(model, repq_fx.QConfig())  # target "onnxruntime": |w| <= 64, exact on every x86
        repq_fx.calibrate(qmodel, calib)
        lowered = repq_fx.lower(qmodel)
        convs = sum(isinstance(m, repq_fx.quant.lowered.QuantizedConv2d) for m in lowered.modules())
        for batch in args.batches:
            x = torch.cat([calib[i % len(calib)] for i in range(batch)])
            t0 = time.perf_counter()
            int8 = repq_fx.compile_int8(lowered, (x,))  # raises unless every integer layer is a oneDNN int8 op
            t_int8 = time.perf_counter() - t0
            float_compiled = torch.compile(merged)
            with torch.no_grad():
                t0 = time.perf_counter()
                float_compiled(x)
                t_float = time.perf_counter() - t0

            def runner(m):
                def run():
                    with torch.no_grad():
                        m(x)
                return run

            runners = {"train-form float, eager": runner(model), "merged float, eager": runner(merged),
                       "merged float, torch.compile": runner(float_compiled), "lowered int8, eager": runner(lowered),
                       "lowered int8, repq_fx.compile_int8": runner(int8)}
            runs = max(1, args.runs // batch)
            times = round_robin(runners, args.rounds, warmup=max(1, args.warmup // batch), repeat=runs)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            base = med["merged float, eager"]
            print(f"{name}, batch {batch}: {convs} int8 convs, compile_int8 compiled in {t_int8:.0f} s "
                  f"(float torch.compile {t_float:.0f} s); {args.rounds} x {runs} runs each\n")
            print("| variant | median latency | vs merged float eager | vs merged float compiled |")
            print("|---|---:|---:|---:|")
            for k, v in med.items():
                print(f"| {k} | {v:.1f} ms | {base / v:.2f}x | {med['merged float, torch.compile'] / v:.2f}x |")
            print(f"\ncompile_int8 speed-up over merged float eager: {base / med['lowered int8, repq_fx.compile_int8']:.2f}x "
                  f"(goal >= 2x at batch 1)\n")
            if batch == args.batches[0]:
                within, worst, same = output_agreement(int8, lowered, check)
                print(f"compile_int8 against the lowered model on {len(check)} other images: {100 * within:.2f} % of "
                      f"outputs within one output step (max {worst:.1f} steps), same class on {100 * same:.1f} %")
                layers = layer_agreement(lowered, torch.cat(check))
                exact = sum(m <= 1.001 for _, _, m in layers)
                print(f"layer by layer (each stretch between quantizers fed the lowered model's own values): {exact} of "
                      f"{len(layers)} quantizers within one step everywhere; worst "
                      f"{100 * min(w for _, w, _ in layers):.3f} % within one step, max {max(m for _, _, m in layers):.1f} "
                      "steps\n")


if __name__ == "__main__":
    main()
