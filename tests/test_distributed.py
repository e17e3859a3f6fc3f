"""``repq-fx train`` under PyTorch's distributed engine, and mixed precision (issue 15).

- ``torchrun --nproc-per-node 2`` (CPU, gloo) through the command line: a RepQ run on a tiny
  synthetic Fashion-MNIST is interrupted after its first epoch, resumed with ``--resume``, and its
  checkpoint restores and lowers (one test, two launches: ~40-70 s on 2 cores, most of it the four
  Python processes importing torch).
- ``run_training`` in two processes (``torch.multiprocessing`` + gloo): after *every* optimizer
  step the two ranks hold identical parameters (LSQ steps included) and quantizer buffers.
- ``--sync-bn``: SyncBatchNorm (or marked BNs) inside RepQ blocks and alone, in two processes, give
  the outputs, gradients and running statistics of one process on the whole batch.
- ``torch.autocast`` (bfloat16, CPU): the weight integers ``round(w / s)`` and the activation grids
  are those of the float32 model, and training steps run.

(``tests/test_ddp.py`` checks a prepared model under a hand-written DDP loop.)
"""
from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import repq_fx
from repq_fx.quant.fake_quant import ActFakeQuant, WeightFakeQuant, fake_quantizers
from repq_fx.quant.sync_stats import mark_sync_batch_norm
from repq_fx.app.train import TrainConfig, restore, run_training, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
needs_dist = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")


@contextlib.contextmanager
def _gloo_group(rank: int, port: int):
    """This spawned process as rank ``rank`` of a two-process gloo group on ``port``, one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "repq_fx", "train", "examples:RepVGGNet", "--method", "repq-bn", "--bits", "4/4",
           "--epochs", "2", "--batch-size", "32", "--calib-batches", "2", "--test-subset", "50", "--threads", "1",
           "--lr", "0.002", "--no-progress", "--out", str(out), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@needs_dist
def test_torchrun_trains_resumes_and_lowers(fake_fmnist: Path) -> None:
    out = fake_fmnist / "w4a4.pt"
    first = _torchrun([], out)
    deadline = time.monotonic() + 120
    while not out.exists():  # epoch 1 written: interrupt the run (torchrun passes SIGTERM on to its workers)
        assert first.poll() is None, f"the run ended before its first checkpoint:\n{first.communicate()[0]}"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGTERM)
    first.communicate(timeout=60)
    assert torch.load(out, weights_only=True)["epoch"] == 1

    second = _torchrun(["--resume"], out)
    log, _ = second.communicate(timeout=150)
    assert second.returncode == 0, log
    assert "resuming" in log and "after epoch 1/2" in log, log
    assert "global batch 64" in log and log.count("epoch 2/2") == 1, log  # rank 0 alone logs

    model, ckpt = restore(out)
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 2 and [h["epoch"] for h in ckpt["metrics"]["history"]] == [1, 2]
    lowered = repq_fx.lower(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert lowered(x).shape == (2, 10)
    assert not fake_quantizers(lowered)


@needs_dist
def test_torchrun_trains_on_an_image_folder(tmp_path: Path) -> None:
    # the user's own images, sharded between two processes; each worker process reads its shard's files
    from test_imagefolder import write_image_folder

    root = write_image_folder(tmp_path / "shapes")
    out = tmp_path / "w8a8.pt"
    run = _torchrun(["--data", f"imagefolder:{root}", "--input-size", "16", "--workers", "1", "--epochs", "1",
                     "--bits", "8/8", "--batch-size", "6"], out)
    log, _ = run.communicate(timeout=240)
    assert run.returncode == 0, log
    assert "global batch 12" in log and log.count("epoch 1/1") == 1, log
    model, ckpt = restore(out)
    assert ckpt["world_size"] == 2 and len(ckpt["config"]["classes"]) == 3
    with torch.no_grad():
        assert repq_fx.lower(model)(torch.randn(2, 3, 16, 16)).shape == (2, 3)


# ------------------------------------------------------------------ two ranks, every step

def _gather_equal(vector: torch.Tensor) -> bool:
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors]) if tensors else torch.zeros(1)


def _worker(rank: int, port: int, out_dir: str) -> None:
    with _gloo_group(rank, port):
        import repq_fx.app.train.run as train  # the module whose run_training calls make_optimizer

        models, checks = [], []
        make_optimizer = train.make_optimizer

        def recording(model, config):  # the model run_training trains (the quantizers live in it)
            models.append(model)
            return make_optimizer(model, config)

        def after_step(optimizer, args, kwargs) -> None:
            model = models[-1]
            quantizers = fake_quantizers(model)
            checks.append((_gather_equal(_flat([p for g in optimizer.param_groups for p in g["params"]])),
                           _gather_equal(_flat([q.scale for q in quantizers])),
                           _gather_equal(_flat([b for q in quantizers for b in q.buffers()]))))

        train.make_optimizer = recording
        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(after_step)
        try:
            config = TrainConfig(model="examples:RepVGGNet", method="repq-bn", bits=(4, 4), epochs=1, batch_size=16,
                                 calib_batches=2, test_subset=20, lr=0.002)
            metrics = run_training(config, Path(out_dir) / "run.pt", progress=False, log=lambda _: None)
            torch.save({"checks": checks, "metrics": metrics},
                       Path(out_dir) / f"rank{rank}.pt")
        finally:
            handle.remove()


@needs_dist
def test_ranks_hold_identical_quantizers_after_every_step(fake_fmnist: Path) -> None:
    context = mp.spawn(_worker, args=(_free_port(), str(fake_fmnist)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail("workers did not finish in 120 s")
    results = [torch.load(fake_fmnist / f"rank{r}.pt", weights_only=False) for r in range(2)]
    checks = results[0]["checks"]
    assert len(checks) == 256 // (2 * 16)  # 256 images, 2 ranks x 16 per step
    for step, (params, steps, buffers) in enumerate(checks, 1):
        assert params and steps and buffers, f"step {step}: ranks differ (params {params}, LSQ steps {steps}, " \
                                            f"quantizer buffers {buffers})"
    assert results[0]["metrics"] == results[1]["metrics"]  # rank 0's evaluation, broadcast
    assert torch.load(fake_fmnist / "run.pt", weights_only=True)["world_size"] == 2


# ------------------------------------------------------------------ mixed precision

def _record(model: torch.nn.Module) -> tuple[dict, list]:
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, inputs, output) -> None:
        seen.setdefault(module.path, (inputs[0].detach(), output.detach()))

    return seen, [q.register_forward_hook(hook) for q in fake_quantizers(model)]


def _integers(q: WeightFakeQuant, w: torch.Tensor) -> torch.Tensor:
    return torch.round(w.float() / q.scale.detach().reshape(-1, *[1] * (w.dim() - 1)))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bf16_autocast_keeps_the_integer_grid(small_repvgg: None, train: bool) -> None:
    from repq_fx.testing.blocks import RepVGGNet

    torch.manual_seed(0)
    qmodel = repq_fx.prepare(RepVGGNet(), repq_fx.QConfig(weight_bits=4, act_bits=4))
    x = torch.randn(8, 1, 28, 28)
    repq_fx.calibrate(qmodel, [x])
    qmodel.train(train)
    state = {k: v.clone() for k, v in qmodel.state_dict().items()}
    seen, hooks = _record(qmodel)
    with torch.no_grad():
        qmodel(x)
    plain = dict(seen)
    seen.clear()
    qmodel.load_state_dict(state)  # the same BN running statistics for the second forward
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = qmodel(x)
    for h in hooks:
        h.remove()
    assert out.dtype == torch.bfloat16 or out.dtype == torch.float32
    weights = [q for q in fake_quantizers(qmodel) if isinstance(q, WeightFakeQuant)]
    same = [torch.equal(_integers(q, plain[q.path][0]), _integers(q, seen[q.path][0])) for q in weights]
    if train:  # batch statistics: blocks after the first read bfloat16 conv outputs, so only the first
        assert same[0]  # block's input (the image) is the same; its merged weight's integers must be too
    else:  # running statistics: every merged weight is a function of the parameters alone
        assert all(same), same
    for q in fake_quantizers(qmodel):
        w_in, w_out = seen[q.path]
        assert w_out.dtype == torch.float32, f"{q.path} returned {w_out.dtype} under autocast"
        if isinstance(q, ActFakeQuant):  # values on the float32 grid s * (k - z), k integer in range
            k = w_out / q.scale + q.zero_point
            assert torch.allclose(k, k.round(), atol=1e-3) and k.min() >= q.quant_min - 1e-3
            assert k.max() <= q.quant_max + 1e-3
    assert all(torch.equal(state[k], v) for k, v in qmodel.state_dict().items()
               if "fake_quant" in k)  # the grid itself (steps, zero points) did not move


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_steps_run_under_autocast(small_repvgg: None, amp: str) -> None:
    from repq_fx.testing.blocks import RepVGGNet

    torch.manual_seed(0)
    qmodel = repq_fx.prepare(RepVGGNet(), repq_fx.QConfig(weight_bits=4, act_bits=4))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    repq_fx.calibrate(qmodel, [x for x, _ in batches])
    before = [p.detach().clone() for p in qmodel.parameters()]
    opt = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu") if amp == "fp16" else None
    loss = train_one_epoch(qmodel, batches, opt, None, F.cross_entropy, progress=False, amp=amp, scaler=scaler)
    assert loss == loss and loss > 0
    assert all(p.dtype == torch.float32 for p in qmodel.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, qmodel.parameters()))


# ------------------------------------------------------------------ SyncBatchNorm: the global batch's statistics

class _NetWithLoneBN(torch.nn.Module):
    """Small RepVGG (its BNs inside blocks) and a BatchNorm1d on the logits (a BN left alone in the graph)."""

    def __init__(self) -> None:
        super().__init__()
        from repq_fx.testing.blocks import RepVGGNet

        self.body = RepVGGNet(widths=(8, 16, 32), blocks_per_stage=2)
        self.bn = torch.nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.body(x))


def _sync_worker(rank: int, port: int, out_dir: str) -> None:
    errors = {}
    with _gloo_group(rank, port):
        # SyncBatchNorm converted before prepare, or plain BNs marked after it (what `repq-fx train --sync-bn` does)
        for mode, how in (("batch", "convert"), ("estimate", "convert"), ("batch", "mark")):
            torch.manual_seed(0)
            net = _NetWithLoneBN()
            # copies: prepare and convert_sync_batchnorm keep the model's Parameter objects, gradients would add up
            whole = repq_fx.prepare(copy.deepcopy(net), repq_fx.QConfig(bn_mode=mode))  # one process, whole batch
            if how == "convert":
                synced = repq_fx.prepare(torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)),
                                         repq_fx.QConfig(bn_mode=mode))
            else:
                synced = repq_fx.prepare(copy.deepcopy(net), repq_fx.QConfig(bn_mode=mode))
                assert mark_sync_batch_norm(synced) > 10
            for m in (whole, synced):  # float values: no rounding decision to flip
                repq_fx.disable_fake_quant(m)
                m.train()
            g = torch.Generator().manual_seed(3)
            x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
            mine = slice(8 * rank, 8 * rank + 8)
            out = synced(x[mine])
            F.cross_entropy(out, y[mine]).backward()
            for p in synced.parameters():  # what DDP does with the gradients
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= 2
            ref = whole(x)
            F.cross_entropy(ref, y).backward()
            pairs = [(a, b) for a, b in zip(synced.parameters(), whole.parameters()) if b.grad is not None]
            stats = [(a, b) for (n, a), (_, b) in zip(synced.named_buffers(), whole.named_buffers()) if "running" in n]
            errors[f"{mode}/{how}"] = {
                "out": ((out - ref[mine]).abs().max() / ref.abs().max()).item(),
                # relative to the largest gradient: the head's bias, right before the BN, has a gradient of ~0
                "grad": max((a.grad - b.grad).abs().max().item() for a, b in pairs)
                / max(b.grad.abs().max().item() for _, b in pairs),
                "running": max((a - b).abs().max().item() for a, b in stats),
                "n_stats": len(stats), "n_grads": len(pairs),
            }
        torch.save(errors, Path(out_dir) / f"sync{rank}.pt")


@needs_dist
def test_sync_batch_norm_inside_blocks_sees_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_sync_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        for mode, err in torch.load(tmp_path / f"sync{rank}.pt").items():
            # each rank's half of the batch, normalized with the whole batch's statistics, gives the rows
            # of one process on the whole batch; the gradients (through the all-reduce) and running stats too
            assert err["out"] < 1e-5 and err["grad"] < 1e-3 and err["running"] < 1e-5, (rank, mode, err)
            assert err["n_stats"] > 20 and err["n_grads"] > 20


def _half_sync_worker(rank: int, port: int, out_dir: str) -> None:
    with _gloo_group(rank, port):
        from repq_fx.ir.norm import batch_norm

        bn = torch.nn.BatchNorm2d(4)
        mark_sync_batch_norm(bn)
        g = torch.Generator().manual_seed(5)
        # 40,960 values per channel on each rank: the global count, 81,920, is past fp16's largest number
        whole = (torch.randn(20, 4, 64, 64, generator=g) * 3 + 2).half()
        mine = whole[10 * rank: 10 * rank + 10]
        y = batch_norm(mine, bn.train())
        ref = torch.nn.functional.batch_norm(whole.double(), None, None, training=True)[10 * rank: 10 * rank + 10]
        torch.save({"dtype": str(y.dtype), "finite": bool(torch.isfinite(y).all()),
                    "err": (y.double() - ref).abs().max().item(),
                    "running_var": bn.running_var.clone(), "ref_var": whole.double().var(dim=(0, 2, 3))},
                   Path(out_dir) / f"half{rank}.pt")


@needs_dist
def test_sync_batch_norm_of_half_inputs_counts_past_fp16(tmp_path: Path) -> None:
    """Regression: fp16 statistics and counts overflowed (OverflowError / inf) once the global count passed 65504."""
    mp.spawn(_half_sync_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"half{rank}.pt")
        assert got["dtype"] == "torch.float16" and got["finite"]
        assert got["err"] < 2e-2  # fp16 output rounding of values within a few units
        expected = 0.9 * 1 + 0.1 * got["ref_var"]  # momentum 0.1 from running_var 1, unbiased over 81,920
        assert torch.allclose(got["running_var"].double(), expected, rtol=1e-4)
