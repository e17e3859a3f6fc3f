"""Time and memory of one QAT training step on a CUDA GPU: float multi-branch model vs RepQ.

The GPU twin of ``benchmarks/qat_step.py`` (same variants, same step: ``zero_grad(set_to_none=True)``,
forward, cross-entropy, backward, SGD step), at ImageNet size: 224x224, batch 64, float32 (cuDNN's
defaults, so convolutions may use TF32). Meant as one short run on a lent GPU machine, under
``--budget`` seconds (default 240) for everything after the imports.

Memory: the variants are built one after the other; for each, ``train peak`` is
``torch.cuda.max_memory_allocated()`` during one step minus the memory allocated before the variant
was moved to the GPU (so: its parameters, buffers, gradients, optimizer state and the step's
activations and temporaries), and ``step peak`` is that peak minus the memory allocated when the
step began. Time: after warm-up, the variants run round robin (rotating order) with
``torch.cuda.synchronize()`` before and after every timed step; the table gives medians.

    python benchmarks/qat_step_gpu.py                      # both models, about 2-4 minutes on an H100
    python benchmarks/qat_step_gpu.py --models repvgg_a0 --rounds 3

Without CUDA it prints a message and exits with status 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qat_step import GOALS, VARIANTS, MiB, _state_bytes, build, make_step


def measure(model_name: str, args, deadline: float, dev: torch.device) -> dict[str, dict]:
    gen = torch.Generator(device=dev).manual_seed(1234)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev, generator=gen)
    target = torch.randint(0, 1000, (args.batch,), device=dev, generator=gen)
    steps, results = {}, {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        step = make_step(build(model_name, v, args.batch, args.size, device=dev), x, target)
        for _ in range(args.warmup):
            step()
        step.optimizer.zero_grad(set_to_none=True)  # the step's own first action, done before the baseline
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        steps[v] = step
        results[v] = {"times": [], "train_peak": peak - before, "step_peak": peak - start,
                      "state": _state_bytes(step.module, step.optimizer)}
        print(f"  built {model_name}/{v} in {time.perf_counter() - t0:.1f} s, "
              f"train peak {results[v]['train_peak'] / MiB:.0f} MiB", file=sys.stderr)
    for r in range(args.rounds):
        if r > 0 and time.perf_counter() > deadline:
            print(f"  time budget reached after {r} rounds", file=sys.stderr)
            break
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            for _ in range(args.steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                steps[v]()
                torch.cuda.synchronize()
                results[v]["times"].append(time.perf_counter() - t0)
    return results


def report(all_results: dict, args) -> str:
    name = torch.cuda.get_device_name()
    cudnn = torch.backends.cudnn
    head = (f"{name}, torch {torch.__version__}, batch {args.batch}, {args.size}x{args.size}, float32 "
            f"(cudnn.allow_tf32={cudnn.allow_tf32}, cudnn.benchmark={cudnn.benchmark}); "
            f"median step over rounds x {args.steps} steps, {args.warmup} warm-up steps excluded")
    columns = ("| model | variant | steps timed | median step (ms) | ratio to float | step peak (MiB) | "
               "train peak (MiB) | state (MiB) |")
    lines = [head, "", columns, "|---|---|---|---|---|---|---|---|"]
    for model_name, res in all_results.items():
        base = statistics.median(res["float"]["times"])
        for v, r in res.items():
            m = statistics.median(r["times"])
            lines.append(f"| {model_name} | {v} | {len(r['times'])} | {1e3 * m:.2f} | {m / base:.2f}x | "
                         f"{r['step_peak'] / MiB:.0f} | {r['train_peak'] / MiB:.0f} | {r['state'] / MiB:.0f} |")
    lines += ["", "| goal | measured on this GPU | verdict |", "|---|---|---|"]
    for text, model_name, variant, limit in GOALS:
        if model_name in all_results:
            res = all_results[model_name]
            ratio = statistics.median(res[variant]["times"]) / statistics.median(res["float"]["times"])
            lines.append(f"| {text} | {ratio:.2f}x | {'met' if ratio <= limit else 'missed'} |")
    for model_name, res in all_results.items():
        est, flt = res["repq-bnest"]["train_peak"], res["float"]["train_peak"]
        lines.append(f"| RepQ-BNEst step memory <= float on {model_name} | {est / MiB:.0f} vs {flt / MiB:.0f} MiB "
                     f"| {'met' if est <= flt else 'missed'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["repvgg_a0", "mobileone_s0"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget", type=float, default=240.0, help="seconds; later rounds are skipped past it")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: qat_step_gpu.py measures nothing here "
              "(run benchmarks/qat_step.py for the CPU figures).")
        return 0
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    results = {}
    for i, model_name in enumerate(args.models):
        # share what is left of the budget among the models still to run
        model_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (len(args.models) - i)
        print(f"{model_name}:", file=sys.stderr)
        results[model_name] = measure(model_name, args, model_deadline, torch.device("cuda"))
    print(report(results, args))
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
