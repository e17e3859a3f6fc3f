"""One process vs ``torchrun --nproc-per-node N`` (CPU, gloo): same model, seed and global batch (issue 15).

Trains ``--model`` with ``repq-fx train``'s own ``run_training`` twice, from the same seed, on the
same Fashion-MNIST subset, for one epoch at the same *global* batch: once in one process with
``--batch-size B``, once under ``torchrun`` in N processes with ``--batch-size B / N`` each
(``--batch-size`` is per process). Both calibrate on the same images (the first global batches).
Each process times every training step (the interval between consecutive optimizer steps:
data, forward, backward, DDP's all-reduce, update) and the table gives, per rank, the median
step and the test accuracy the run ends with. One torch thread per process (``--threads``), so N
processes use N cores.

    .venv/bin/python benchmarks/ddp_scaling.py --subset 12800 --batch 64     # 200 steps, ~2-4 min on 2 cores

The runs are not bit-identical (N shards see the images in another order, and each BN
normalizes with its process's share of the batch), so the accuracies agree to within run-to-run noise,
not exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from repq_fx.app import distributed
    from repq_fx.app.train import TrainConfig, run_training

    torch.set_num_threads(args.threads)
    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    config = TrainConfig(model=args.model, method=args.method, bits=(args.bits, args.bits), epochs=1,
                         batch_size=args.batch_size, subset=args.subset, test_subset=args.test_subset, seed=0,
                         calib_batches=args.calib_batches)
    with distributed.session("cpu"):
        start = time.perf_counter()
        metrics = run_training(config, Path(args.out_dir) / f"w{distributed.world_size()}.pt", overwrite=True,
                               progress=False, log=lambda _: None)
        wall = time.perf_counter() - start
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        record = {"rank": distributed.rank(), "world": distributed.world_size(), "steps": len(stamps),
                  "median_step_s": statistics.median(steps), "wall_s": wall, "metrics": metrics}
        with open(Path(args.out_dir) / f"w{record['world']}-rank{record['rank']}.json", "w") as f:
            json.dump(record, f)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="examples:RepVGGNet")
    p.add_argument("--method", default="repq-bn")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--batch", type=int, default=64, help="global batch (one process: all of it)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--subset", type=int, default=12800, help="training images (steps = subset / batch)")
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.batch % args.nproc:
        p.error(f"--batch {args.batch} must split evenly over --nproc {args.nproc}")
    out_dir = tempfile.mkdtemp(prefix="ddp_scaling_")
    common = [os.path.abspath(__file__), "--worker", "--out-dir", out_dir, "--model", args.model, "--method",
              args.method, "--bits", str(args.bits), "--subset", str(args.subset), "--test-subset",
              str(args.test_subset), "--calib-batches", str(args.calib_batches), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    runs = [("1 process", [sys.executable, *common, "--batch-size", str(args.batch)]),
            (f"torchrun x{args.nproc}", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                         str(args.nproc), "--master-port", str(_free_port()), *common,
                                         "--batch-size", str(args.batch // args.nproc)])]
    for name, cmd in runs:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            return 1
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"{args.model} {args.method} W{args.bits}A{args.bits}, Fashion-MNIST subset {args.subset}, 1 epoch, "
          f"global batch {args.batch}, seed 0, {args.threads} thread(s) per process, CPU (gloo)\n")
    print("| run | rank | batch per process | steps | median step (ms) | images/s (all ranks) | top-1 (%) | "
          "train wall (s) |\n|---|---|---|---|---|---|---|---|")
    for world in (1, args.nproc):
        for r in range(world):
            rec = json.loads((Path(out_dir) / f"w{world}-rank{r}.json").read_text())
            ms = 1e3 * rec["median_step_s"]
            print(f"| {'1 process' if world == 1 else f'torchrun x{world}'} | {r} | {args.batch // world} | "
                  f"{rec['steps']} | {ms:.1f} | {args.batch / rec['median_step_s']:.0f} | "
                  f"{rec['metrics'].get('top1', float('nan')):.2f} | {rec['wall_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
