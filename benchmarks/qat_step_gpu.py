"""Time and memory of one QAT training step on a CUDA GPU: float multi-branch model vs RepQ.

The GPU twin of ``benchmarks/qat_step.py`` (same step: ``zero_grad(set_to_none=True)``, forward,
cross-entropy, backward, SGD step), at ImageNet size: 224x224, batch 64, float32 (cuDNN's
defaults, so convolutions may use TF32) or, with ``--amp bf16|fp16``, the forward under
``torch.autocast`` (fp16 without loss scaling: timing only). Meant as one short run on a lent GPU
machine, under ``--budget`` seconds (default 240) for everything after the imports.

Variants, on timm ``repvgg_a0`` and ``mobileone_s0`` (``--models``), each eager and, unless
``--no-compile``, compiled (``+compile``: ``repq_fx.compile``, i.e. ``torch.compile`` with inductor):

- ``float``: the multi-branch model in train mode; ``float-merged``: ``repq_fx.merge`` (one conv per
  block, the deploy model trained in float);
- ``repq-bn`` / ``repq-bnest``: ``repq_fx.prepare`` with ``bn_mode="batch"`` / ``"estimate"``, W8A8;
- ``torchao``: ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` of the unmerged model (fake quant
  on every branch conv, W8A8, as ``benchmarks/accuracy.py``); a variant that fails to build (e.g.
  a model torch.ao cannot trace) is reported and left out.

``--device cpu --size 32 --batch 2 --rounds 1 --steps 1 --warmup 1`` is a smoke check of the script
on a machine without a GPU (times are CPU times, memory columns are empty).

Memory: the variants are built one after the other; for each, ``train peak`` is
``torch.cuda.max_memory_allocated()`` during one step minus the memory allocated before the variant
was moved to the GPU (so: its parameters, buffers, gradients, optimizer state and the step's
activations and temporaries), and ``step peak`` is that peak minus the memory allocated when the
step began. Time: after warm-up, the variants run round robin (rotating order) with
``torch.cuda.synchronize()`` before and after every timed step; the table gives medians.

    python benchmarks/qat_step_gpu.py                      # both models, about 2-4 minutes on an H100
    python benchmarks/qat_step_gpu.py --models repvgg_a0 --rounds 3 --amp bf16
    python benchmarks/qat_step_gpu.py --device cpu --size 32 --batch 2 --rounds 1 --steps 1 --warmup 1 --no-compile

With ``--device cuda`` (the default) and no CUDA it prints a message and exits with status 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qat_step import GOALS, MiB, _state_bytes, build, make_step

BASE_VARIANTS = ("float", "float-merged", "repq-bn", "repq-bnest", "torchao")
COMPILE = "+compile"
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Autocast(torch.nn.Module):
    """``module``'s forward under ``torch.autocast(device, dtype)``."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.module(x)


def build_torchao(model_name: str, batch: int, size: int, device: torch.device) -> torch.nn.Module:
    """torch.ao's per-branch QAT (``prepare_qat_fx``, W8A8) of the unmerged timm model."""
    import warnings

    import timm
    from accuracy import _ao_qconfig
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = prepare_qat_fx(model, QConfigMapping().set_global(_ao_qconfig(8, 8)),
                                (torch.randn(2, 3, size, size),))
    qmodel.to(device)
    with torch.no_grad():  # the observers' first ranges, as calibration
        qmodel(torch.randn(batch, 3, size, size, device=device))
    return qmodel.train()


def build_variant(model_name: str, variant: str, args, dev: torch.device) -> torch.nn.Module:
    base = variant.removesuffix(COMPILE)
    module = (build_torchao(model_name, args.batch, args.size, dev) if base == "torchao"
              else build(model_name, base, args.batch, args.size, device=dev))
    if args.amp:
        module = Autocast(module, AMP[args.amp])
    if variant.endswith(COMPILE):
        import repq_fx

        module = repq_fx.compile(module)
    return module


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(model_name: str, args, deadline: float, dev: torch.device) -> dict[str, dict]:
    cuda = dev.type == "cuda"
    gen = torch.Generator(device=dev).manual_seed(1234)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev, generator=gen)
    target = torch.randint(0, 1000, (args.batch,), device=dev, generator=gen)
    steps, results = {}, {}
    for v in args.variants:
        t0 = time.perf_counter()
        _sync(dev)
        before = torch.cuda.memory_allocated() if cuda else 0
        try:
            step = make_step(build_variant(model_name, v, args, dev), x, target)
            for _ in range(max(1, args.warmup)):  # (compiled variants compile here)
                step()
        except Exception as e:  # a variant that cannot be built or run is reported, not fatal
            print(f"  {model_name}/{v} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            continue
        step.optimizer.zero_grad(set_to_none=True)  # the step's own first action, done before the baseline
        _sync(dev)
        start = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step()
        _sync(dev)
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        steps[v] = step
        results[v] = {"times": [], "train_peak": peak - before, "step_peak": peak - start,
                      "state": _state_bytes(step.module, step.optimizer), "build_s": time.perf_counter() - t0}
        print(f"  built {model_name}/{v} in {time.perf_counter() - t0:.1f} s, "
              f"train peak {results[v]['train_peak'] / MiB:.0f} MiB", file=sys.stderr)
    names = list(steps)
    for r in range(args.rounds):
        if r > 0 and time.perf_counter() > deadline:
            print(f"  time budget reached after {r} rounds", file=sys.stderr)
            break
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order:
            for _ in range(args.steps):
                _sync(dev)
                t0 = time.perf_counter()
                steps[v]()
                _sync(dev)
                results[v]["times"].append(time.perf_counter() - t0)
    return results


def report(all_results: dict, args) -> str:
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    cudnn = torch.backends.cudnn
    precision = f"autocast {args.amp}" if args.amp else "float32"
    head = (f"{name}, torch {torch.__version__}, batch {args.batch}, {args.size}x{args.size}, {precision} "
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
        if model_name in all_results and variant in all_results[model_name] and "float" in all_results[model_name]:
            res = all_results[model_name]
            ratio = statistics.median(res[variant]["times"]) / statistics.median(res["float"]["times"])
            lines.append(f"| {text} | {ratio:.2f}x | {'met' if ratio <= limit else 'missed'} |")
    for model_name, res in all_results.items():
        if "repq-bnest" not in res or "float" not in res or args.device != "cuda":
            continue
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
    p.add_argument("--variants", nargs="+", default=list(BASE_VARIANTS), choices=BASE_VARIANTS)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager variants only")
    p.add_argument("--amp", choices=sorted(AMP), help="forward under torch.autocast in this dtype")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke check of the script")
    args = p.parse_args(argv)
    args.variants = [w for v in args.variants for w in ((v, v + COMPILE) if args.compile else (v,))]
    if args.device == "cuda" and not torch.cuda.is_available():
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
        results[model_name] = measure(model_name, args, model_deadline, torch.device(args.device))
    print(report(results, args))
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
