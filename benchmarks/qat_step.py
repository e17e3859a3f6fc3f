"""Time and memory of one QAT training step: float multi-branch model vs RepQ, on CPU.

One step is ``zero_grad(set_to_none=True)``, forward, cross-entropy, backward, SGD step.
Variants, all built from the same timm model (``pretrained=False``):

- ``float``:      the original multi-branch model in train mode (plain float training);
- ``repq-bn``:    ``repq_fx.prepare(bn_mode="batch")`` (RepQ-BN), W8A8, calibrated on 2 random batches;
- ``repq-bnest``: ``bn_mode="estimate"`` (RepQ-BNEst);
- ``repq-running``: ``bn_mode="running"`` (frozen BN; a reference, not a RepQ training mode).

Time: every variant lives in the same process; after ``--warmup`` steps each, the variants run
round robin (the order rotates every round) for ``--rounds`` rounds of ``--steps`` steps, and each
step is timed alone. The table gives the median step and its ratio to ``float``. ``--clock cpu``
(with ``--threads 1``) times each step by the CPU time of the thread that runs it instead of the
wall clock: on a box shared with other jobs it does not count the time the step waits for a core.

Memory: each variant is measured again in a fresh subprocess (``--memory-child``) with glibc's
mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so every tensor buffer is its own
mapping and goes back to the OS when freed: resident memory then follows live tensor memory. The
child resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) right before a step and reads
``VmHWM`` after it. ``step peak`` is that peak minus the RSS once the step's ``zero_grad`` has run
(activations, temporaries, new gradients); ``train peak`` is the peak minus the RSS after imports (also the
parameters, buffers, gradients and optimizer state). ``state`` is the size of parameters, buffers,
gradients and optimizer state counted from the tensors themselves.

``--compile`` adds, next to each variant, its compiled twin (``float+compile``,
``repq-bn+compile``, ...): ``repq_fx.compile``, i.e. ``torch.compile`` with inductor and its CPU
layout optimization off (see :mod:`repq_fx.compiling`). ``+torch-compile`` variants (given to
``--variants``, like ``+compile`` ones) use plain ``torch.compile`` with inductor's defaults. All
are timed in the same round robin. Each compiled model is first checked against its
eager twin (a deep copy: train-mode forward on the timed batch, relative error <= 1e-4, or <= 10x
the eager model's own float noise (fake quant, deep random nets), see :func:`compile_checked`; else the run stops;
``--compile-check-float`` also checks RepQ with fake quant off at 1e-4), then makes one training
step; the wall time of that check forward and that first step
(dominated by compilation: Dynamo, AOTAutograd, inductor and the C++ compiler, forward and
backward) is reported as its compile time and excluded from the step timings. Inductor's on-disk
caches go to a fresh temporary directory (``TORCHINDUCTOR_CACHE_DIR``, unless set), so compile
times are cold-cache times.

``--memory-budget B`` sets AOTAutograd's activation memory budget for the compiled variants (and
their memory subprocesses): below its default 1.0 the partitioner recomputes more of the forward in
backward instead of saving it, trading step time for memory.

``--profile`` prints, instead, where RepQ-BN spends a step: an ablation over variants (merged
float model, RepQ without fake quant, ...), a per-node forward breakdown and torch.profiler's top ops.

    .venv/bin/python benchmarks/qat_step.py --models repvgg_a0 mobileone_s0 --rounds 20 --steps 1 --warmup 4
    .venv/bin/python benchmarks/qat_step.py --models repvgg_a0 mobileone_s0 --profile --rounds 20 --steps 1
    .venv/bin/python benchmarks/qat_step.py --variants float repq-bnest repq-bn --compile --threads 1 --clock cpu --no-memory
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from repq_fx.app.bench import TrainStep, round_robin, summarize

warnings.filterwarnings("ignore")

VARIANTS = ("float", "repq-bn", "repq-bnest", "repq-running")
COMPILE = "+compile"  # suffix of a variant run through repq_fx.compile (inductor, CPU layout optimization off)
TORCH_COMPILE = "+torch-compile"  # suffix of a variant run through plain torch.compile (inductor defaults)
COMPILE_CHECK_RTOL = 1e-4
MODES = {"repq-bn": "batch", "repq-bnest": "estimate", "repq-running": "running"}
# extra variants of --profile: the one-conv deploy model trained in float, and RepQ with fake quant off
PROFILE_VARIANTS = ("float", "float-merged", "repq-running-nofq", "repq-running", "repq-bnest", "repq-bn-nofq",
                    "repq-bn")
GOALS = [  # (text of the goal in the issue, model, variant, maximum ratio to float)
    ("RepQ-BN <= 1.6x float on repvgg_a0", "repvgg_a0", "repq-bn", 1.6),
    ("RepQ-BNEst <= 1.0x float on repvgg_a0", "repvgg_a0", "repq-bnest", 1.0),
    ("RepQ-BNEst <= 0.6x float on mobileone_s0", "mobileone_s0", "repq-bnest", 0.6),
]
MiB = 2 ** 20


def build(model_name: str, variant: str, batch: int, size: int, seed: int = 0,
          device: str | torch.device = "cpu") -> nn.Module:
    """The module that ``variant`` trains, on ``device``, in train mode.

    The model is created and prepared on the CPU (the check of ``prepare`` runs there on a
    small input), then moved to ``device`` and calibrated there on 2 random batches.
    """
    import timm

    import repq_fx

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False)
    if variant == "float":
        return model.to(device).train()
    if variant == "float-merged":
        return repq_fx.merge(model).to(device).train()
    mode = MODES[variant.removesuffix("-nofq")]
    gen = torch.Generator().manual_seed(seed + 1)
    check = torch.randn(2, 3, 64, 64, generator=gen)
    calib = [torch.randn(batch, 3, size, size, generator=gen).to(device) for _ in range(2)]
    qmodel = _prepare_checked(model, repq_fx.QConfig(bn_mode=mode, weight_bits=8, act_bits=8), check)
    qmodel.to(device)
    repq_fx.calibrate(qmodel, calib)
    if variant.endswith("-nofq"):
        repq_fx.disable_fake_quant(qmodel)
    return qmodel.train()


def _prepare_checked(model: nn.Module, config, x: torch.Tensor, tries: int = 3) -> fx.GraphModule:
    """``prepare``, checked: with fake quant off, its eval output must equal the original's.

    (A guard against a wrong graph; see RESULTS.md. A retry is reported on stderr.)
    """
    import repq_fx

    ref = model.eval()(x)
    for attempt in range(1, tries + 1):
        qmodel = repq_fx.prepare(model, config)
        repq_fx.disable_fake_quant(qmodel)
        try:
            with torch.no_grad():
                out = qmodel.eval()(x)
            err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        except RuntimeError as e:
            err, why = float("inf"), str(e).splitlines()[0]
        else:
            why = f"relative error {err:.2e}"
        if err <= 1e-3:
            repq_fx.enable_fake_quant(qmodel)
            return qmodel
        print(f"warning: prepare({config.bn_mode}) attempt {attempt} gave a wrong model ({why}); retrying",
              file=sys.stderr)
    raise RuntimeError(f"prepare({config.bn_mode}) gave a wrong model {tries} times")


make_step = TrainStep  # (module, x, target): the step every variant times; qat_step_gpu.py imports it


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def _jitter_noise(module: nn.Module, x: torch.Tensor, eps: float = 1e-7) -> float:
    """How far eager train-mode outputs move when every parameter is scaled by ``1 + eps * N(0, 1)``
    (about one float32 rounding): the float noise a fake-quantized model amplifies, since a value
    that moves across a rounding boundary moves a whole quantization step."""
    a, b = copy.deepcopy(module), copy.deepcopy(module)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=gen).to(p))
        return _rel(b(x), a(x))


def is_compiled(variant: str) -> bool:
    return variant.endswith((COMPILE, TORCH_COMPILE))


def compile_checked(module: nn.Module, x: torch.Tensor, target: torch.Tensor, rtol: float = COMPILE_CHECK_RTOL,
                    check_float: bool = False, compiler=None) -> tuple[TrainStep, dict[str, float]]:
    """``compiler(module)`` (default ``repq_fx.compile``), checked, and its training step after one untimed step.

    The compiled model's train-mode forward on ``x`` is compared with an eager deep copy's (max abs
    error / max abs value); the state that forward changed (BN running statistics) is then restored.
    It must agree within ``rtol``, or within 10x the eager model's own float noise
    (:func:`_jitter_noise`): compiled code rounds floats differently (fused, reordered ops); with
    fake quant on that flips some round-to-nearest decisions by one step, and those flips propagate
    (timm repvgg_a0, RepQ, random weights: ~2e-2), and deep float models with random weights amplify
    rounding too (mobileone_s0 float: ~2e-4). ``check_float`` also compiles a copy
    with fake quant off (a separate compilation, not timed) and requires ``rtol`` there: the weight
    synthesis, BN statistics and convs of the compiled graph, without rounding decisions.

    Returns the step and ``{"compile_s": wall seconds of the check forward plus the first step
    (compilation of forward and backward), "check_err": the relative error, "noise": the eager
    noise, "float_err": the error with fake quant off}``.
    """
    import repq_fx
    from repq_fx.quant.fake_quant import fake_quantizers

    compiler = compiler or repq_fx.compile
    info: dict[str, float] = {}
    quantized = bool(fake_quantizers(module))
    if check_float and quantized:
        a, b = copy.deepcopy(module), copy.deepcopy(module)
        repq_fx.disable_fake_quant(a)
        repq_fx.disable_fake_quant(b)
        info["float_err"] = _rel(compiler(b)(x), a(x))
        del a, b
        if not info["float_err"] <= rtol:
            raise RuntimeError(f"with fake quant off the compiled model disagrees with eager: relative error "
                               f"{info['float_err']:.2e} > {rtol:.0e}")
    info["noise"] = _jitter_noise(module, x)
    eager = copy.deepcopy(module)
    saved = copy.deepcopy(module.state_dict())
    compiled = compiler(module)
    t0 = time.perf_counter()
    out = compiled(x)
    t_forward = time.perf_counter() - t0
    info["check_err"] = _rel(out, eager(x))
    del out, eager
    tol = max(rtol, 10 * info["noise"])
    if not info["check_err"] <= tol:
        raise RuntimeError(f"the compiled model disagrees with eager: relative error {info['check_err']:.2e} > "
                           f"{tol:.1e} (eager noise {info['noise']:.1e})")
    module.load_state_dict(saved)
    step = make_step(compiled, x, target)
    t0 = time.perf_counter()
    step()
    info["compile_s"] = t_forward + time.perf_counter() - t0
    return step, info


def variant_step(model_name: str, variant: str, x: torch.Tensor, target: torch.Tensor, args
                 ) -> tuple[TrainStep, dict[str, float]]:
    """The training step of ``variant`` (``+compile``: compiled and checked, see :func:`compile_checked`)."""
    module = build(model_name, variant.removesuffix(COMPILE).removesuffix(TORCH_COMPILE), args.batch, args.size)
    if is_compiled(variant):
        compiler = torch.compile if variant.endswith(TORCH_COMPILE) else None
        return compile_checked(module, x, target, check_float=getattr(args, "compile_check_float", False),
                               compiler=compiler)
    return make_step(module, x, target), {}


def inputs(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


def time_variants(model_name: str, variants: tuple[str, ...], args,
                  info: dict[str, dict[str, float]] | None = None) -> dict[str, list[float]]:
    """Per-step seconds of each variant, measured round robin in this process (compile times and
    checks of ``+compile`` variants go into ``info``)."""
    x, target = inputs(args.batch, args.size)
    steps = {}
    for v in variants:
        t0 = time.perf_counter()
        steps[v], extra = variant_step(model_name, v, x, target, args)
        if info is not None:
            info[v] = extra
        more = ("".join([f" (compile {extra['compile_s']:.1f} s, error vs eager {extra['check_err']:.1e}, ",
                         f"eager noise {extra['noise']:.1e}",
                         f", error with fake quant off {extra['float_err']:.1e}" if "float_err" in extra else "",
                         ")"]) if "compile_s" in extra else "")
        print(f"  built {model_name}/{v} in {time.perf_counter() - t0:.1f} s{more}", file=sys.stderr)

    def report(r: int, times: dict[str, list[float]]) -> None:
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v} {1e3 * statistics.median(times[v]):.0f} ms" for v in variants), file=sys.stderr)

    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    return round_robin(steps, args.rounds, warmup=args.warmup, repeat=args.steps, clock=clock, on_round=report)


# ---------------------------------------------------------------- memory (fresh subprocess per variant)

def _proc_status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    tensors += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def memory_child(model_name: str, variant: str, args) -> dict:
    import timm  # noqa: F401  (imported before the baseline)

    import repq_fx  # noqa: F401

    x, target = inputs(args.batch, args.size)
    _release()
    rss_imports = _proc_status()["VmRSS"]
    step, _ = variant_step(model_name, variant, x, target, args)
    module = step.module
    _release()
    for _ in range(2):
        step()
    step_peaks, train_peaks = [], []
    for _ in range(args.mem_steps):
        step.optimizer.zero_grad(set_to_none=True)  # the step's own first action, done before the baseline
        _release()
        if not _reset_peak():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs is not writable)")
        start = _proc_status()["VmRSS"]
        step()
        peak = _proc_status()["VmHWM"]
        step_peaks.append(peak - start)
        train_peaks.append(peak - rss_imports)
    return {"step_peak": max(step_peaks), "train_peak": max(train_peaks),
            "state": _state_bytes(module, step.optimizer)}  # type: ignore[attr-defined]


def measure_memory(model_name: str, variant: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", model_name, variant,
           "--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads),
           "--mem-steps", str(args.mem_steps)]
    if args.memory_budget is not None:
        cmd += ["--memory-budget", str(args.memory_budget)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {model_name}/{variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report

def table(results: dict, args) -> str:
    head = (f"CPU, torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
            f"{args.size}x{args.size}, float32, {args.clock} clock; median of {args.rounds} rounds x {args.steps} steps "
            f"({args.warmup} warm-up steps excluded)")
    compiled = any(is_compiled(v) for per_variant in results.values() for v in per_variant)
    columns = ("| model | variant | median step (ms) | IQR (ms) | min (ms) | ratio to float (median) | "
               "ratio to float (min) | " + ("ratio to float+compile (median) | compile (s) | " if compiled else "")
               + "step peak (MiB) | train peak (MiB) | state (MiB) |")
    lines = [head, "", columns, "|" + "---|" * columns.count(" | ") + "---|"]
    for model_name, per_variant in results.items():
        base = statistics.median(per_variant["float"]["times"])
        base_min = min(per_variant["float"]["times"])
        base_compiled = (statistics.median(per_variant["float" + COMPILE]["times"])
                         if "float" + COMPILE in per_variant else None)
        for v, r in per_variant.items():
            s = summarize(r["times"])
            mem = r.get("memory")
            cells = ([f"{mem['step_peak'] / MiB:.1f}", f"{mem['train_peak'] / MiB:.1f}", f"{mem['state'] / MiB:.1f}"]
                     if mem else ["-", "-", "-"])
            if compiled:
                compile_s = r.get("info", {}).get("compile_s")
                cells = [f"{s.median / base_compiled:.2f}x" if base_compiled else "-",
                         f"{compile_s:.1f}" if compile_s is not None else "-"] + cells
            lines.append(f"| {model_name} | {v} | {1e3 * s.median:.1f} | "
                         f"{1e3 * s.q1:.1f}-{1e3 * s.q3:.1f} | {1e3 * s.minimum:.1f} | {s.median / base:.2f}x | "
                         f"{s.minimum / base_min:.2f}x | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: dict) -> str:
    lines = ["", "| goal | measured | verdict |", "|---|---|---|"]
    for text, model_name, variant, limit in GOALS:
        r = results.get(model_name, {})
        for v, base, how in ((variant, "float", ""), (variant + COMPILE, "float", " (compiled, vs eager float)"),
                             (variant + COMPILE, "float" + COMPILE, " (compiled, vs compiled float)"),
                             (variant + TORCH_COMPILE, "float", " (torch.compile defaults, vs eager float)")):
            if v not in r or base not in r:
                continue
            ratio = statistics.median(r[v]["times"]) / statistics.median(r[base]["times"])
            lines.append(f"| {text}{how} | {ratio:.2f}x | {'met' if ratio <= limit else 'missed'} |")
    for model_name, r in results.items():
        for v in ("repq-bnest", "repq-bnest" + COMPILE):
            if v not in r or not r[v].get("memory") or not r["float"].get("memory"):
                continue
            est, flt = r[v]["memory"], r["float"]["memory"]
            for key, what in (("train_peak", "train peak"), ("step_peak", "step peak")):
                ok = est[key] <= flt[key]
                lines.append(f"| RepQ-BNEst step memory <= float on {model_name} ({v} {what}) | "
                             f"{est[key] / MiB:.1f} vs {flt[key] / MiB:.1f} MiB | {'met' if ok else 'missed'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- profile of RepQ-BN

def categorize(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Each node of a prepared graph: weight synthesis, BN statistics, fake quant, conv, or other data op."""
    from repq_fx.quant.bn_stats import block_statistics, branch_statistics, input_moments
    from repq_fx.quant.fake_quant import ActFakeQuant, WeightFakeQuant

    data: set[fx.Node] = set()
    cats: dict[fx.Node, str] = {}
    for n in gm.graph.nodes:
        ins = [a for a in n.all_input_nodes]
        if n.op == "placeholder":
            data.add(n)
            cats[n] = "other"
        elif n.op == "get_attr":
            cats[n] = "weight synthesis"
        elif n.target in (block_statistics, branch_statistics, input_moments):
            cats[n] = "BN statistics"  # what follows from them (BN folds, kernel sums) is weight synthesis
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), WeightFakeQuant):
            cats[n] = "weight fake quant"
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), ActFakeQuant):
            cats[n] = "activation fake quant"
            data.add(n)
        elif any(a in data for a in ins):
            data.add(n)
            cats[n] = "merged conv / linear" if n.target in (F.conv2d, torch.conv2d, F.linear) else \
                "other data ops (act, pool, head)"
        else:
            cats[n] = "weight synthesis"
    return cats


def forward_breakdown(gm: fx.GraphModule, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Forward seconds per category (train mode, with autograd recording), median over ``repeats``."""
    cats = categorize(gm)
    runs: list[dict[str, float]] = []

    class Timed(fx.Interpreter):
        def run_node(self, n):
            t0 = time.perf_counter()
            out = super().run_node(n)
            acc[cats[n]] = acc.get(cats[n], 0.0) + time.perf_counter() - t0
            return out

    for _ in range(repeats):
        acc: dict[str, float] = {}
        Timed(gm).run(x)
        runs.append(acc)
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}


def profile(model_name: str, args) -> None:
    x, target = inputs(args.batch, args.size)
    print(f"## Ablation, {model_name} (median step, same process, round robin)\n")
    times = time_variants(model_name, PROFILE_VARIANTS, args)
    base = statistics.median(times["float"])
    print("| variant | what it adds | median step (ms) | ratio to float |\n|---|---|---|---|")
    what = {"float": "multi-branch model, float", "float-merged": "one conv per block (merge()), float",
            "repq-running-nofq": "weight synthesis M(theta) + merged conv, no fake quant",
            "repq-running": "+ weight and activation fake quant", "repq-bnest": "+ estimated BN statistics",
            "repq-bn-nofq": "batch BN statistics, no fake quant", "repq-bn": "RepQ-BN (full)"}
    for v in PROFILE_VARIANTS:
        m = statistics.median(times[v])
        print(f"| {v} | {what[v]} | {1e3 * m:.1f} | {m / base:.2f}x |")

    qmodel = build(model_name, "repq-bn", args.batch, args.size)
    step = make_step(qmodel, x, target)
    for _ in range(args.warmup):
        step()
    print(f"\n## RepQ-BN forward by node category, {model_name} (fx.Interpreter, median of 5)\n")
    fwd = forward_breakdown(qmodel, x, repeats=5)
    total = sum(fwd.values())
    print("| category | forward ms | share |\n|---|---|---|")
    for k, v in sorted(fwd.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {1e3 * v:.1f} | {100 * v / total:.0f}% |")
    print(f"| total (interpreted) | {1e3 * total:.1f} | |")

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(f"\n## RepQ-BN step, torch.profiler top ops by self CPU time, {model_name} (3 steps)\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=45))
    convs = [e for e in prof.key_averages() if e.key in ("aten::convolution", "aten::convolution_backward")]
    for e in convs:
        print(f"{e.key}: {e.count // 3} calls per step")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["repvgg_a0", "mobileone_s0"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                   choices=sorted(set(VARIANTS) | set(PROFILE_VARIANTS) | {v + c for v in VARIANTS for c in (COMPILE, TORCH_COMPILE)}))
    p.add_argument("--compile", action="store_true",
                   help="add the repq_fx.compile (inductor) twin of each variant (see the docstring)")
    p.add_argument("--compile-check-float", action="store_true",
                   help="also check each compiled RepQ model with fake quant off (one more compilation each)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: time.perf_counter; cpu: CPU time of the stepping thread (needs --threads 1)")
    p.add_argument("--mem-steps", type=int, default=3, help="steps measured in each memory subprocess")
    p.add_argument("--memory-budget", type=float, help="compiled variants: AOTAutograd's activation memory "
                   "budget (torch._functorch.config.activation_memory_budget, 1.0 = its default; lower "
                   "recomputes more in backward to save memory)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--profile", action="store_true", help="where RepQ-BN spends its time (see the docstring)")
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu measures one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    if args.memory_budget is not None:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = args.memory_budget
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # cold caches: compile times as a first run sees them
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="qat_step_inductor_")

    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, args)))
        return
    if args.profile:
        for model_name in args.models:
            profile(model_name, args)
        return
    variants = list(args.variants) if "float" in args.variants else ["float", *args.variants]
    if args.compile:
        variants = [w for v in variants for w in ((v,) if is_compiled(v) else (v, v + COMPILE))]
        variants = list(dict.fromkeys(variants))  # (a twin also named in --variants)
    variants = tuple(variants)
    results: dict[str, dict[str, dict]] = {}
    for model_name in args.models:
        print(f"{model_name}: timing", file=sys.stderr)
        info: dict[str, dict[str, float]] = {}
        times = time_variants(model_name, variants, args, info)
        results[model_name] = {v: {"times": times[v], "info": info.get(v, {})} for v in variants}
        print(table({model_name: results[model_name]}, args), file=sys.stderr)  # (in case a later model fails)
        gc.collect()
        if not args.no_memory:
            for v in variants:
                results[model_name][v]["memory"] = measure_memory(model_name, v, args)
                print(f"  memory {model_name}/{v}: {results[model_name][v]['memory']}", file=sys.stderr)
    print(table(results, args))
    print(goals(results))


if __name__ == "__main__":
    main()
