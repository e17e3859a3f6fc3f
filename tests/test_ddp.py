"""A prepared model under DistributedDataParallel (2 CPU processes, gloo).

Both ranks prepare the example RepVGGNet (float32), calibrate it on *rank-specific* data, wrap
it in DDP and take 3 SGD steps on rank-specific batches. Afterwards every parameter and buffer
must be identical on both ranks.

DDP settings, and why:

- ``find_unused_parameters=False`` (the default) is right: every parameter of the prepared model
  (branch conv weights, BN affine, LSQ step sizes of the weight and activation quantizers, the
  head) takes part in the loss, so DDP's reducer sees a gradient for each of them every step.
- ``broadcast_buffers=True`` (the default) is right: the prepared model keeps the BNs' running
  statistics and the quantizers' state (zero points, flags, observed ranges) as buffers, and the
  BN statistics are updated *inside* the forward (``branch_statistics``, under no_grad), from
  each rank's own batch -- exactly as ``nn.BatchNorm2d`` does under DDP. DDP re-broadcasts
  rank 0's buffers at the start of every forward, so the ranks never drift apart by more than
  one step, and DDP does not complain about buffers changing in forward.
- That last step is the catch: after the final forward each rank holds running statistics
  updated with its *own* batch, so they differ (the test checks that they do). Like timm's
  ``distribute_bn(..., reduce=True)`` at the end of an epoch, the test all-reduces (averages)
  the BN running statistics once after training; then everything is identical.
- The calibration runs before wrapping, on different data per rank: DDP's constructor
  broadcasts rank 0's parameters *and* buffers, which covers the quantizer state as well.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import repq_fx
from repq_fx.testing.blocks import RepVGGNet

WORLD_SIZE = 2
STEPS = 3
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_running_stats(model: nn.Module) -> list[torch.Tensor]:
    return [b for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def _gather_equal(vector: torch.Tensor) -> bool:
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
        qmodel = repq_fx.prepare(RepVGGNet())
        g = torch.Generator().manual_seed(100 + rank)
        repq_fx.calibrate(qmodel, [torch.randn(8, 1, 28, 28, generator=g) for _ in range(2)])
        qmodel.train()
        start = _flat(list(qmodel.parameters()))

        ddp = DDP(qmodel)  # broadcast_buffers=True, find_unused_parameters=False: see the docstring
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for _ in range(STEPS):
            x = torch.randn(8, 1, 28, 28, generator=g)
            y = torch.randint(0, 10, (8,), generator=g)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()

        stats = _bn_running_stats(qmodel)
        stats_equal_before_sync = _gather_equal(_flat(stats))
        with torch.no_grad():
            for t in stats:
                dist.all_reduce(t)
                t.div_(world_size)

        params_equal = _gather_equal(_flat(list(qmodel.parameters())))
        buffers_equal = _gather_equal(_flat([b for b in qmodel.buffers()]))
        trained = not torch.equal(_flat(list(qmodel.parameters())), start)
        torch.save({"params_equal": params_equal, "buffers_equal": buffers_equal, "trained": trained,
                    "stats_equal_before_sync": stats_equal_before_sync,
                    "n_params": sum(p.numel() for p in qmodel.parameters()),
                    "n_buffers": sum(b.numel() for b in qmodel.buffers())},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_two_ranks_stay_identical(tmp_path) -> None:
    context = mp.spawn(_worker, args=(WORLD_SIZE, _free_port(), str(tmp_path)), nprocs=WORLD_SIZE,
                       join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"DDP workers did not finish in {TIMEOUT_S} s")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for r, res in enumerate(results):
        assert res["trained"], f"rank {r}: parameters did not change"
        assert res["params_equal"], f"rank {r}: parameters differ across ranks"
        assert res["buffers_equal"], f"rank {r}: buffers differ across ranks"
        # Why the final all-reduce of the BN statistics is needed (see the docstring).
        assert not res["stats_equal_before_sync"]
    assert results[0]["n_params"] == results[1]["n_params"]
