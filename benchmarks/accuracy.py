"""Accuracy benchmark: RepQ against every baseline, by bit width, on real data.

Every quantized method of a net starts from the same float checkpoint (trained here, once, seed
0) and gets the same QAT budget (``--qat-epochs``, SGD lr 0.01 cosine for Fashion-MNIST, Adam
1e-4 for SR: :class:`repq_fx.app.train.TrainConfig`'s defaults) and the same seeds:

==============  =====================================================================================
method          what it is
==============  =====================================================================================
fp              the float checkpoint itself
ptq             ``repq_fx.merge`` then min-max per-channel PTQ (calibrated, not trained)
lsq             ``merge`` then LSQ QAT of the merged convs (the RepQ paper's "merge then QAT" baseline)
torchao         ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` on the *unmerged* float model,
                per-channel weights (FakeQuantize quant_min/quant_max at the given bits): QAT per
                branch. It cannot be lowered to one conv per block: the table counts the
                fake-quantized convs per block (Q(W3) + Q(W1) is not a b-bit kernel).
qarepvgg-ptq    the same net with QARepVGG blocks, trained in float with the same schedule (its own
                float checkpoint), then merge + min-max PTQ (RepVGGNet only)
repq-bn         RepQ with exact batch statistics of the branch BNs (``bn_mode="batch"``)
repq-bnest      RepQ-BNEst: BN statistics estimated from input moments (``bn_mode="estimate"``)
==============  =====================================================================================

First and last layer stay at 8 bits in every method. Every method quantized by repq_fx (all but
``fp`` and ``torchao``) trains the integer grid of a deployment target (``--targets``, default
``onnxruntime``: ``QConfig.target``, see ``repq_fx.targets``); the target is part of a job's identity,
so one results file can hold the same cell for several targets. Lines written before targets
existed trained full-range int8 weights: they count as ``onnxruntime-vnni``. Nets: ``RepVGGNet`` (the small RepVGG of
``docs/fashion-mnist-baseline.md``) and ``ACResNet18`` on Fashion-MNIST (top-1 %, 10k test images), ``ECBSR``
(M4C16, x2) on the scikit-image photographs (PSNR on Y, dB).

Results are appended to a JSON-lines file (``--out``, default ``benchmarks/out/accuracy.jsonl``),
one line per (net, method, bits, seed, target) and budget (float epochs, QAT epochs, subset); a rerun
skips what is there, and checkpoints under ``benchmarks/out/ckpt`` let an interrupted training
run continue. At the end (or with ``--report-only``) it prints a markdown table (mean ± std over
seeds where there are several) and writes a matplotlib plot.

    .venv/bin/python benchmarks/accuracy.py --preset session          # what fits one session
    .venv/bin/python benchmarks/accuracy.py --preset full             # the whole grid
    .venv/bin/python benchmarks/accuracy.py --preset session --report-only
    .venv/bin/python benchmarks/accuracy.py --nets RepVGGNet --methods ptq repq-bn --bits W4A4 --seeds 0 1 2
    .venv/bin/python benchmarks/accuracy.py --methods repq-bn --bits W8A8 --targets onnxruntime onnxruntime-u8u8

Several processes may share one results file: each claims a job before running it (a claim file
under ``ckpt/claims`` naming its pid; a dead process's claim is taken over) and the float
checkpoint is trained under a file lock, so on a loaded 2-core machine two workers of one thread
each (``--threads 1``, started twice) get more done than one worker of two threads.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from repq_fx.targets import DEFAULT_TARGET, LEGACY_TARGET, TARGETS
from repq_fx.app.train import (TrainConfig, cosine_schedule, evaluate, make_loaders, make_optimizer, parse_bits,
                               run_training, train_one_epoch)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "accuracy.jsonl"
DEFAULT_CKPT = HERE / "out" / "ckpt"
DEFAULT_PLOT = HERE / "accuracy.png"

METHODS = ("fp", "ptq", "lsq", "torchao", "qarepvgg-ptq", "repq-bn", "repq-bnest")
METHOD_LABELS = {
    "fp": "FP (float)",
    "ptq": "merge + min-max PTQ",
    "lsq": "merge + LSQ QAT",
    "torchao": "torch.ao QAT per branch",
    "qarepvgg-ptq": "QARepVGG FP + PTQ",
    "repq-bn": "RepQ-BN",
    "repq-bnest": "RepQ-BNEst",
}
BITS = ("W8A8", "W4A8", "W8A4", "W4A4", "W3A8", "W3A3")
# methods whose integer grid is repq_fx's QConfig, hence set by a deployment target (fp is float;
# torch.ao's per-branch QAT has its own FakeQuantize grid)
TARGETED_METHODS = ("ptq", "lsq", "qarepvgg-ptq", "repq-bn", "repq-bnest")


@dataclass(frozen=True)
class NetSpec:
    """A benchmarked net: its model spec, data, and (RepVGG only) the QARepVGG twin."""

    model: str
    data: str
    qarepvgg: str | None = None

    @property
    def metric(self) -> str:
        return "psnr" if self.data == "sr" else "top1"


NETS: dict[str, NetSpec] = {
    "RepVGGNet": NetSpec("examples:RepVGGNet", "fashion-mnist", qarepvgg="examples:QARepVGGNet"),
    "ACResNet18": NetSpec("examples:ACResNet18", "fashion-mnist"),
    "ECBSR": NetSpec("examples:ECBSR", "sr"),
}


@dataclass
class Budget:
    """Float epochs (per net), QAT epochs, training subset and test subset of a run."""

    fp_epochs: dict[str, int]
    qat_epochs: int
    subset: int | None = None
    test_subset: int | None = None

    def fp(self, net: str) -> int:
        return self.fp_epochs.get(net, self.fp_epochs.get("*", 10))


@dataclass
class Preset:
    nets: tuple[str, ...]
    methods: tuple[str, ...]
    bits: tuple[str, ...]
    seeds: tuple[int, ...]            # seeds of the multi-seed points
    multi_seed_bits: tuple[str, ...]  # bit widths that get every seed (others: the first seed only)
    fp_epochs: dict[str, int]
    qat_epochs: int
    subset: int | None = None
    test_subset: int | None = None
    note: str = ""


LOW_BITS = tuple(b for b in BITS if min(parse_bits(b)) <= 4)
PRESETS: dict[str, Preset] = {
    # Every net, method and bit width; 3 seeds at the 4- and 3-bit points.
    "full": Preset(nets=("RepVGGNet", "ACResNet18", "ECBSR"), methods=METHODS, bits=BITS, seeds=(0, 1, 2),
                   multi_seed_bits=LOW_BITS, fp_epochs={"*": 10, "ECBSR": 20}, qat_epochs=2,
                   note="the whole grid (days of 2-core CPU time)"),
    # What fits one session on a shared, loaded 2-core machine (about 90 minutes, two 1-thread workers).
    "session": Preset(nets=("RepVGGNet",), methods=METHODS, bits=BITS, seeds=(0, 1, 2),
                      multi_seed_bits=("W4A4", "W3A8"), fp_epochs={"*": 5}, qat_epochs=1,
                      note="small RepVGG, 5 float epochs, 1 QAT epoch, 3 seeds at W4A4 and W3A8"),
    # ECBSR at W8A8: float against RepQ (the PSNR goal).
    "sr": Preset(nets=("ECBSR",), methods=("fp", "ptq", "lsq", "repq-bn", "repq-bnest"), bits=("W8A8",),
                 seeds=(0,), multi_seed_bits=(), fp_epochs={"*": 20}, qat_epochs=1),
    # A minute or two: checks that everything runs (not a measurement).
    "smoke": Preset(nets=("RepVGGNet",), methods=METHODS, bits=("W4A4",), seeds=(0,), multi_seed_bits=(),
                    fp_epochs={"*": 1}, qat_epochs=1, subset=512, test_subset=1000),
}


@dataclass(frozen=True)
class Job:
    net: str
    method: str
    bits: str  # "FP" for method fp
    seed: int
    target: str | None = None  # the deployment target of a TARGETED_METHODS job (default: DEFAULT_TARGET)

    def __post_init__(self) -> None:
        # one spelling per job, the one its result line gets (record_target): None where no target applies
        wanted = (self.target or DEFAULT_TARGET) if self.method in TARGETED_METHODS else None
        object.__setattr__(self, "target", wanted)

    def key(self, budget: Budget) -> tuple:
        return (self.net, self.method, self.bits, self.seed, self.target, budget.fp(self.net), budget.qat_epochs,
                budget.subset, budget.test_subset)


def record_target(rec: dict[str, Any]) -> str | None:
    """The deployment target a result line was trained for: its ``target``, or for a line of a targeted
    method written before targets existed the grid it trained (full-range int8: ``onnxruntime-vnni``).

    >>> record_target({"method": "repq-bn"}), record_target({"method": "repq-bn", "target": "onnxruntime"})
    ('onnxruntime-vnni', 'onnxruntime')
    >>> record_target({"method": "torchao"}) is None
    True
    """
    if rec["method"] not in TARGETED_METHODS:
        return None
    return rec.get("target") or LEGACY_TARGET


def record_key(rec: dict[str, Any]) -> tuple:
    return (rec["net"], rec["method"], rec["bits"], rec["seed"], record_target(rec), rec["fp_epochs"],
            rec["qat_epochs"], rec.get("subset"), rec.get("test_subset"))


def record_cell(rec: dict[str, Any]) -> tuple:
    """(net, method, bits, seed, target): what a line measured, budget aside."""
    return (rec["net"], rec["method"], rec["bits"], rec["seed"], record_target(rec))


def make_jobs(nets: Sequence[str], methods: Sequence[str], bits: Sequence[str], seeds: Sequence[int],
              multi_seed_bits: Sequence[str], registry: dict[str, NetSpec] | None = None,
              targets: Sequence[str] = (DEFAULT_TARGET,)) -> list[Job]:
    """Jobs in priority order: the float runs, every (bits, method, target) at the first seed, then the
    other seeds. Methods outside :data:`TARGETED_METHODS` run once, whatever the targets.

    >>> [(j.method, j.bits, j.seed) for j in make_jobs(["RepVGGNet"], ["fp", "ptq"], ["W8A8", "W4A4"], [0, 1], ["W4A4"])]
    [('fp', 'FP', 0), ('ptq', 'W8A8', 0), ('ptq', 'W4A4', 0), ('ptq', 'W4A4', 1)]
    >>> [(j.method, j.target) for j in make_jobs(["RepVGGNet"], ["torchao", "lsq"], ["W8A8"], [0], [],
    ...                                          targets=["onnxruntime", "onnxruntime-u8u8"])]
    [('torchao', None), ('lsq', 'onnxruntime'), ('lsq', 'onnxruntime-u8u8')]
    """
    registry = NETS if registry is None else registry
    jobs: list[Job] = []
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    for net in nets:
        if "fp" in methods:
            jobs.append(Job(net, "fp", "FP", 0))  # one float checkpoint, seed 0
    for rank, seed in enumerate(seeds):
        for net in nets:
            for b in bits:
                if rank > 0 and b not in multi_seed_bits:
                    continue
                for m in methods:
                    if m == "fp" or (m == "qarepvgg-ptq" and registry[net].qarepvgg is None):
                        continue
                    for target in (targets if m in TARGETED_METHODS else (None,)):
                        jobs.append(Job(net, m, b, seed, target))
    return jobs


# ---------------------------------------------------------------------------
# Running one job.
# ---------------------------------------------------------------------------

def _bits_tag(budget: Budget, net: str) -> str:
    tag = f"fp{budget.fp(net)}-q{budget.qat_epochs}"
    if budget.subset:
        tag += f"-sub{budget.subset}"
    if budget.test_subset:
        tag += f"-test{budget.test_subset}"
    return tag


def fp_checkpoint(model: str, spec: NetSpec, net: str, budget: Budget, ckpt_dir: Path,
                  log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """Train (or resume, or reuse) the float checkpoint of ``model`` (seed 0); returns its path and metrics."""
    name = model.split(":")[-1].replace(".", "_")
    epochs = budget.fp(net)
    path = ckpt_dir / f"{name}-fp-e{epochs}{'-sub%d' % budget.subset if budget.subset else ''}.pt"
    cfg = TrainConfig(model=model, data=spec.data, method="fp", epochs=epochs, seed=0, subset=budget.subset,
                      test_subset=budget.test_subset)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:  # parallel workers: one trains, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        metrics = run_training(cfg, path, resume=True, progress=False, log=log)
    return path, metrics


def run_job(job: Job, budget: Budget, *, nets: dict[str, NetSpec] | None = None, ckpt_dir: Path = DEFAULT_CKPT,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one (net, method, bits, seed) and return its result record (a JSON-able dict)."""
    nets = NETS if nets is None else nets
    spec = nets[job.net]
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rec: dict[str, Any] = {**_identity(job, budget), "metric": spec.metric, "model": spec.model, "data": spec.data}
    fp_path, fp_metrics = fp_checkpoint(spec.model, spec, job.net, budget, ckpt_dir, log)
    rec["fp_value"] = fp_metrics[spec.metric]
    if job.method == "fp":
        rec.update(value=fp_metrics[spec.metric], deployable="float", convs_per_block=None)
    elif job.method == "torchao":
        rec.update(_run_torchao(job, spec, budget, fp_path, log))
    else:
        model, data_method = spec.model, job.method
        source = fp_path
        if job.method == "qarepvgg-ptq":
            if spec.qarepvgg is None:
                raise ValueError(f"{job.net} has no QARepVGG variant")
            model, data_method = spec.qarepvgg, "ptq"
            source, qa_metrics = fp_checkpoint(spec.qarepvgg, spec, job.net, budget, ckpt_dir, log)
            rec["qarepvgg_fp_value"] = qa_metrics[spec.metric]
        cfg = TrainConfig(model=model, data=spec.data, method=data_method, bits=parse_bits(job.bits),
                          epochs=budget.qat_epochs, seed=job.seed, from_ckpt=str(source), subset=budget.subset,
                          test_subset=budget.test_subset, target=job.target or DEFAULT_TARGET)
        # checkpoints of the legacy grid keep the name they had before targets existed (they resume)
        target_tag = "" if cfg.target == LEGACY_TARGET else f"-{cfg.target}"
        out = ckpt_dir / f"{job.net}-{job.method}-{job.bits}{target_tag}-s{job.seed}-{_bits_tag(budget, job.net)}.pt"
        metrics = run_training(cfg, out, resume=True, progress=False, log=log)
        rec.update(value=metrics[spec.metric], deployable="one int conv per block", convs_per_block=1,
                   qconfig=cfg.qconfig().to_dict())
    rec["seconds"] = round(time.perf_counter() - start, 1)
    rec["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    rec["torch"] = torch.__version__
    rec["git"] = _GIT
    return rec


def _identity(job: Job, budget: Budget) -> dict[str, Any]:
    """The fields of a result line that make its key (:func:`record_key`)."""
    rec: dict[str, Any] = {"net": job.net, "method": job.method, "bits": job.bits, "seed": job.seed,
                           "fp_epochs": budget.fp(job.net), "qat_epochs": budget.qat_epochs, "subset": budget.subset,
                           "test_subset": budget.test_subset}
    if job.target is not None:
        rec["target"] = job.target
    return rec


def _git_version() -> str | None:
    """HEAD of the checkout this process imported, with "+dirty" if repq_fx had uncommitted edits."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "repq_fx"], cwd=HERE.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


_GIT = _git_version()


# ---------------------------------------------------------------------------
# torch.ao per-branch QAT.
# ---------------------------------------------------------------------------

def _ao_qconfig(weight_bits: int, act_bits: int):
    from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver, QConfig)

    act = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2 ** act_bits - 1,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                                    quant_min=-(2 ** (weight_bits - 1)), quant_max=2 ** (weight_bits - 1) - 1,
                                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0,
                                    reduce_range=False)
    return QConfig(activation=act, weight=weight)


def _block_names(model: nn.Module) -> list[str]:
    """Names of the outermost re-parametrized blocks (the example networks' ReparamBlock)."""
    from repq_fx.testing.blocks import ReparamBlock

    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, ReparamBlock) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def _first_last(model: nn.Module, blocks: Sequence[str]) -> tuple[str, str]:
    """The modules holding the first and the last conv/linear (a whole block where they sit in one)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def outer(name: str) -> str:
        return next((b for b in blocks if name.startswith(b + ".")), name)

    return outer(layers[0]), outer(layers[-1])


def prepare_torchao(model: nn.Module, bits: tuple[int, int], example_inputs: tuple) -> tuple[nn.Module, dict]:
    """``prepare_qat_fx`` of the unmerged float ``model`` at ``bits`` (first and last layer W8A8), and
    how many fake-quantized convs each re-parametrized block has."""
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    blocks = _block_names(model)
    first, last = _first_last(model, blocks)
    mapping = (QConfigMapping().set_global(_ao_qconfig(*bits))
               .set_module_name(first, _ao_qconfig(8, 8)).set_module_name(last, _ao_qconfig(8, 8)))
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice, once per call
        warnings.simplefilter("ignore", DeprecationWarning)
        qmodel = prepare_qat_fx(model.train(), mapping, example_inputs)
    per_block = {}
    for b in blocks:
        per_block[b] = sum(1 for n, m in qmodel.named_modules()
                           if n.startswith(b + ".") and hasattr(m, "weight_fake_quant")
                           and isinstance(m, nn.modules.conv._ConvNd))
    n_fq = sum(1 for m in qmodel.modules() if hasattr(m, "weight_fake_quant"))
    return qmodel, {"per_block": per_block, "weight_fake_quants": n_fq, "first_last_8bit": [first, last]}


def _run_torchao(job: Job, spec: NetSpec, budget: Budget, fp_path: Path, log: Callable[[str], None]) -> dict:
    from repq_fx.app.models import resolve_model
    from repq_fx.app.train import load_checkpoint

    cfg = TrainConfig(model=spec.model, data=spec.data, method="lsq", bits=parse_bits(job.bits),
                      epochs=budget.qat_epochs, seed=job.seed, subset=budget.subset,
                      test_subset=budget.test_subset).resolved()  # "lsq": the quantized defaults (lr, wd)
    torch.manual_seed(cfg.seed)
    model = resolve_model(spec.model)
    model.load_state_dict(load_checkpoint(fp_path)["model"])
    train_loader, test_loader = make_loaders(cfg, epoch=0)
    x0 = next(iter(train_loader))[0][:2]
    qmodel, info = prepare_torchao(model, cfg.bits, (x0,))
    qmodel.eval()
    with torch.no_grad():  # observers see a few training batches first, as the other methods calibrate
        for x, _ in islice(train_loader, cfg.calib_batches):
            qmodel(x)
    optimizer = make_optimizer(qmodel, cfg)
    steps = len(train_loader)
    scheduler = cosine_schedule(optimizer, steps * cfg.epochs)
    loss_fn = F.l1_loss if spec.data == "sr" else F.cross_entropy
    for epoch in range(cfg.epochs):
        loader, _ = make_loaders(cfg, epoch=epoch)
        t = time.perf_counter()
        loss = train_one_epoch(qmodel, loader, optimizer, scheduler, loss_fn, progress=False,
                               desc=f"torchao epoch {epoch + 1}")
        log(f"torchao {job.bits} epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f} {time.perf_counter() - t:.1f} s")
    metrics = evaluate(qmodel, cfg, test_loader)
    counts = sorted(set(info["per_block"].values()))
    return {"value": metrics[spec.metric], "deployable": "no: " + "/".join(map(str, counts))
            + " fake-quantized convs per block", "convs_per_block": info["per_block"],
            "weight_fake_quants": info["weight_fake_quants"], "first_last_8bit": info["first_last_8bit"]}


# ---------------------------------------------------------------------------
# The results file, the table and the plot.
# ---------------------------------------------------------------------------

def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by a kill: ignored, the job reruns
                continue
    return out


def append_result(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _select(records: Iterable[dict[str, Any]], budget: Budget, nets: Sequence[str]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("value") is not None and r["net"] in nets
            and (r["fp_epochs"], r["qat_epochs"], r.get("subset"), r.get("test_subset"))
            == (budget.fp(r["net"]), budget.qat_epochs, budget.subset, budget.test_subset)]


def summarize(values: Sequence[float]) -> tuple[float, float | None, int]:
    """(mean, sample std or None for one value, n).

    >>> summarize([1.0, 2.0, 3.0])
    (2.0, 1.0, 3)
    """
    mean = sum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None), len(values)


def _cell(values: Sequence[float], digits: int) -> str:
    if not values:
        return "–"
    mean, std, n = summarize(values)
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


def _series(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[tuple[str, str | None, str]]:
    """(method, target, label) of each row of a table, in ``methods`` order, one per target found; the
    label names the target when the rows hold more than one.

    >>> rows = [{"method": "repq-bn", "target": t} for t in ("onnxruntime", "onnxruntime-u8u8")]
    >>> [label for _, _, label in _series(rows + [{"method": "torchao"}], ["torchao", "repq-bn"])]
    ['torch.ao QAT per branch', 'RepQ-BN [onnxruntime]', 'RepQ-BN [onnxruntime-u8u8]']
    """
    targets = [t for t in TARGETS if any(record_target(r) == t for r in rows)]
    out = []
    for m in methods:
        for t in (targets if m in TARGETED_METHODS else [None]):
            if any(r["method"] == m and record_target(r) == t for r in rows):
                label = METHOD_LABELS.get(m, m) + (f" [{t}]" if t is not None and len(targets) > 1 else "")
                out.append((m, t, label))
    return out


def markdown_table(records: Sequence[dict[str, Any]], nets: Sequence[str], methods: Sequence[str],
                   bits: Sequence[str]) -> str:
    """One table per net: rows are methods (one per deployment target where there are several),
    columns bit widths, cells mean ± std over seeds."""
    lines: list[str] = []
    for net in nets:
        rows = [r for r in records if r["net"] == net]
        if not rows:
            continue
        metric = rows[0]["metric"]
        digits = 2
        unit = "PSNR (dB, Y)" if metric == "psnr" else "top-1 (%)"
        fp = [r["value"] for r in rows if r["method"] == "fp"]
        budget = rows[0]
        targets = [t for t in TARGETS if any(record_target(r) == t for r in rows)]
        lines.append(f"**{net}** ({unit}; float {budget['fp_epochs']} epochs, QAT {budget['qat_epochs']} "
                     f"epoch(s){', subset %s' % budget['subset'] if budget.get('subset') else ''}; "
                     f"float: {_cell(fp, digits)}{'; target ' + ', '.join(targets) if targets else ''})")
        lines.append("")
        lines.append("| method | one conv per block? | " + " | ".join(bits) + " |")
        lines.append("|---|---|" + "---:|" * len(bits))
        for m, target, label in _series(rows, methods):
            mrows = [r for r in rows if r["method"] == m and record_target(r) == target]
            if m == "fp":
                cells = [_cell([r["value"] for r in mrows], digits)] * len(bits)
                dep = "float"
            else:
                cells = [_cell([r["value"] for r in mrows if r["bits"] == b], digits) for b in bits]
                deps = sorted({str(r.get("deployable")) for r in mrows})
                dep = "yes" if deps == ["one int conv per block"] else "; ".join(deps)
            if m == "qarepvgg-ptq":
                qa = sorted({round(r["qarepvgg_fp_value"], 2) for r in mrows if "qarepvgg_fp_value" in r})
                label += f" (its float: {', '.join(map(str, qa))})"
            lines.append(f"| {label} | {dep} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], nets: Sequence[str], methods: Sequence[str], bits: Sequence[str],
         path: Path) -> Path | None:
    """Grouped bars per net: bit widths on x, one bar per method (mean, error bar = std), float as a line."""
    nets = [n for n in nets if any(r["net"] == n for r in records)]
    if not nets:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(nets), figsize=(max(7, 1.6 * len(bits)) * len(nets) + 2.5, 4.5), squeeze=False)
    qmethods = [m for m in methods if m != "fp"]
    for ax, net in zip(axes[0], nets):
        rows = [r for r in records if r["net"] == net]
        metric = rows[0]["metric"]
        series = _series(rows, qmethods)
        width = 0.8 / max(1, len(series))
        for i, (m, target, label) in enumerate(series):
            xs, ys, es = [], [], []
            for j, b in enumerate(bits):
                vals = [r["value"] for r in rows
                        if r["method"] == m and record_target(r) == target and r["bits"] == b]
                if vals:
                    mean, std, _ = summarize(vals)
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(mean)
                    es.append(std or 0.0)
            if xs:
                bars = ax.bar(xs, ys, width, yerr=es, capsize=2, label=label)
                ax.bar_label(bars, fmt="%.1f", fontsize=6, rotation=90, padding=2)
        fp = [r["value"] for r in rows if r["method"] == "fp"]
        if fp:
            ax.axhline(sum(fp) / len(fp), color="black", linestyle="--", linewidth=1, label="float")
        ax.set_xticks(range(len(bits)), bits)
        ax.set_ylabel("PSNR on Y (dB)" if metric == "psnr" else "top-1 accuracy (%)")
        ax.set_title(f"{net} ({rows[0]['fp_epochs']} float epochs, {rows[0]['qat_epochs']} QAT epoch(s))")
        if metric == "top1":
            ax.set_ylim(0, 105)
        else:
            vals = [r["value"] for r in rows]
            ax.set_ylim(min(vals) - 1.0, max(vals) + 0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# The whole benchmark.
# ---------------------------------------------------------------------------

def run_benchmark(jobs: Sequence[Job], budget: Budget, out: Path, *, nets: dict[str, NetSpec] | None = None,
                  ckpt_dir: Path = DEFAULT_CKPT, stop_at: _dt.datetime | None = None,
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every job whose key is not in ``out`` yet (in order), appending each result; returns
    the new records. A job that raises is recorded with its ``error`` and the rest go on."""
    done = {record_key(r) for r in load_results(out) if r.get("value") is not None}
    new: list[dict[str, Any]] = []
    todo = [j for j in jobs if j.key(budget) not in done]
    log(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already in {out}; {len(todo)} to run")
    for i, job in enumerate(todo):
        if stop_at is not None and _dt.datetime.now() >= stop_at:
            log(f"stop time {stop_at:%H:%M} reached: {len(todo) - i} jobs left for a later run")
            break
        claim = _claim(job, budget, ckpt_dir)
        if claim is None:
            log(f"[{i + 1}/{len(todo)}] {_describe(job)}: another worker runs it")
            continue
        if job.key(budget) in {record_key(r) for r in load_results(out) if r.get("value") is not None}:
            claim.unlink(missing_ok=True)  # finished by another worker meanwhile
            continue
        log(f"[{i + 1}/{len(todo)}] {_describe(job)}")
        try:
            rec = run_job(job, budget, nets=nets, ckpt_dir=ckpt_dir, log=log)
        except Exception as e:  # recorded, not fatal: the table says what failed
            log(traceback.format_exc())
            rec = {**_identity(job, budget), "value": None, "error": f"{type(e).__name__}: {e}"[:500]}
        append_result(out, rec)
        claim.unlink(missing_ok=True)
        new.append(rec)
        if rec.get("value") is not None:
            log(f"  -> {rec['metric']} {rec['value']:.2f} (float {rec['fp_value']:.2f})  {rec['seconds']:.0f} s")
    return new


def _describe(job: Job) -> str:
    return f"{job.net} {job.method} {job.bits} seed {job.seed}" + (f" target {job.target}" if job.target else "")


def _claim(job: Job, budget: Budget, ckpt_dir: Path) -> Path | None:
    """Claim ``job`` for this process (several workers may share one results file); None if a
    live process holds it. A claim of a process that is gone is taken over."""
    folder = ckpt_dir / "claims"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (hashlib.sha1(repr(job.key(budget)).encode()).hexdigest()[:16] + ".claim")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
                os.kill(pid, 0)
                if pid != os.getpid():
                    return None
            except PermissionError:  # alive, another user's
                return None
            except (ValueError, ProcessLookupError, FileNotFoundError):
                pass
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    return None


def _parse_stop(text: str | None) -> _dt.datetime | None:
    if not text:
        return None
    hh, mm = map(int, text.split(":"))
    now = _dt.datetime.now()
    return now.replace(hour=hh, minute=mm, second=0, microsecond=0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="session",
                        help="the grid and budget; every option below overrides its part (default: session)")
    parser.add_argument("--nets", nargs="+", choices=sorted(NETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--bits", nargs="+", help="bit widths, e.g. W8A8 W4A4 (first/last layer stay 8-bit)")
    parser.add_argument("--seeds", nargs="+", type=int, help="QAT seeds of the multi-seed points (others: the first)")
    parser.add_argument("--multi-seed-bits", nargs="*", help="bit widths that get every seed")
    parser.add_argument("--fp-epochs", type=int, help="float epochs (every net)")
    parser.add_argument("--qat-epochs", type=int, help="QAT epochs of every quantized method")
    parser.add_argument("--subset", type=int, help="training images (Fashion-MNIST) / patches per epoch (SR)")
    parser.add_argument("--test-subset", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=[DEFAULT_TARGET],
                        help="deployment targets (QConfig.target) of the methods quantized by repq_fx, each its own "
                             f"job (default {DEFAULT_TARGET}; lines written before targets existed count as "
                             f"{LEGACY_TARGET})")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results, JSON lines (default {DEFAULT_OUT})")
    parser.add_argument("--ckpt-dir", type=Path, default=DEFAULT_CKPT)
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default benchmarks/accuracy-PRESET.png)")
    parser.add_argument("--stop-at", help="HH:MM: start no new job after this time (results so far are kept)")
    parser.add_argument("--report-only", action="store_true", help="print the table and plot from --out, run nothing")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    nets = tuple(args.nets or preset.nets)
    methods = tuple(args.methods or preset.methods)
    bits = tuple("W%dA%d" % parse_bits(b) for b in (args.bits or preset.bits))
    seeds = tuple(args.seeds if args.seeds is not None else preset.seeds)
    multi = tuple(args.multi_seed_bits if args.multi_seed_bits is not None else preset.multi_seed_bits)
    multi = tuple("W%dA%d" % parse_bits(b) for b in multi)
    fp_epochs = {"*": args.fp_epochs} if args.fp_epochs is not None else dict(preset.fp_epochs)
    budget = Budget(fp_epochs=fp_epochs, qat_epochs=args.qat_epochs if args.qat_epochs is not None else preset.qat_epochs,
                    subset=args.subset if args.subset is not None else preset.subset,
                    test_subset=args.test_subset if args.test_subset is not None else preset.test_subset)
    torch.set_num_threads(args.threads)
    jobs = make_jobs(nets, methods, bits, seeds, multi, targets=args.targets)
    if not args.report_only:
        run_benchmark(jobs, budget, args.out, ckpt_dir=args.ckpt_dir, stop_at=_parse_stop(args.stop_at))
    records = _select(load_results(args.out), budget, nets)
    wanted = {(j.net, j.method, j.bits, j.seed, j.target) for j in jobs}
    records = [r for r in records if record_cell(r) in wanted]
    bits = tuple(b for b in BITS if b in bits) + tuple(b for b in bits if b not in BITS)  # table order
    print()
    print(markdown_table(records, nets, methods, bits))
    ok = {record_key(r) for r in records}
    failed = [r for r in load_results(args.out) if r.get("error") and record_key(r) not in ok
              and record_cell(r) in wanted]
    for r in failed:
        target = record_target(r)
        print(f"failed: {r['net']} {r['method']} {r['bits']} seed {r['seed']}{' target ' + target if target else ''}: "
              f"{r['error']}")
    path = plot(records, nets, methods, bits, args.plot or HERE / f"accuracy-{args.preset}.png")
    if path:
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
