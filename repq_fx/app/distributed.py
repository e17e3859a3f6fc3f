"""Many processes with PyTorch's own engine: ``torchrun`` + ``torch.distributed`` + DDP.

``torchrun --nproc-per-node N -m repq_fx train ...`` starts N copies of the command with the
environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`session` reads them and opens the default process group (``gloo`` on
the CPU, ``nccl`` on CUDA, where each process takes the GPU ``LOCAL_RANK``) and closes it at the
end; without them (a plain ``repq-fx train``) it does nothing, and every helper below answers as
for one process. A group opened by the caller (tests: ``torch.multiprocessing`` + gloo) is used
as it is and left open.

The helpers: :func:`rank`, :func:`world_size`, :func:`is_main` (rank 0), :func:`barrier`,
:func:`broadcast_object` (rank 0's Python value to every rank), :func:`all_mean` (the mean of a
number over ranks) and :func:`shard_loader` (a training loader's dataset split by
``torch.utils.data.DistributedSampler``, reshuffled per epoch with ``set_epoch``).

>>> with session("cpu") as device:
...     device, world_size(), rank(), is_main()
('cpu', 1, 0, True)
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from ..errors import ConfigError

__all__ = ["all_mean", "barrier", "broadcast_object", "from_launcher", "is_main", "rank", "session",
           "shard_loader", "world_size"]

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def from_launcher() -> bool:
    """True when this process was started by ``torchrun`` (its environment variables are set).

    >>> from_launcher()
    False
    """
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE")) and int(os.environ["WORLD_SIZE"]) > 1


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group).

    >>> rank()
    0
    """
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes (1 without a process group).

    >>> world_size()
    1
    """
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0: the process that logs, shows progress and writes checkpoints.

    >>> is_main()
    True
    """
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process).

    >>> barrier()
    """
    if active():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (pickled; for small Python values such as metrics).

    >>> broadcast_object({"top1": 91.0})
    {'top1': 91.0}
    """
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_mean(value: float, device: torch.device | str = "cpu") -> float:
    """The mean of ``value`` over the ranks (one all-reduce).

    >>> all_mean(2.5)
    2.5
    """
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextlib.contextmanager
def session(device: str = "cpu") -> Iterator[str]:
    """Open the default process group from ``torchrun``'s environment for the ``with`` block, and
    yield the device this process trains on: ``cuda`` becomes ``cuda:LOCAL_RANK`` (and the current
    CUDA device). Without the launcher's variables, or inside a group that is already open, it
    yields ``device`` and opens nothing.

    >>> with session("cpu") as d:
    ...     d
    'cpu'
    """
    opened = False
    if from_launcher() and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise ConfigError("this torch build has no torch.distributed: run without torchrun")
        kind = torch.device(device).type
        if kind == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: start "
                                  "torchrun with --nproc-per-node at most the number of GPUs")
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        elif kind != "cpu":
            raise ConfigError(f"torchrun runs on --device cpu (gloo) or cuda (nccl), not {device!r}")
        dist.init_process_group(_backend(device))
        opened = True
    elif active() and torch.device(device).type == "cuda" and torch.device(device).index is None:
        device = f"cuda:{torch.cuda.current_device()}"
    try:
        yield device
    finally:
        if opened:
            dist.destroy_process_group()


def shard_loader(loader: Any, epoch: int, seed: int) -> Any:
    """``loader`` with its dataset split among the ranks by a ``DistributedSampler`` (shuffled by
    ``seed``, reshuffled by ``set_epoch(epoch)``; padded so that every rank takes the same number
    of steps), at the same per-process batch size; ``loader`` itself in one process.

    Both loader forms of :mod:`repq_fx.app.data` are kept: a ``BatchSampler`` over a dataset that
    takes a list of indices (Fashion-MNIST gathers and augments a whole batch at once) and a
    plain batched ``DataLoader``. A dataset's ``generator`` (its augmentation) is reseeded per
    rank, so that the ranks do not draw the same crops.

    >>> shard_loader([1, 2], epoch=0, seed=0)
    [1, 2]
    """
    if not active():
        return loader
    if not isinstance(loader, DataLoader):
        raise ConfigError(f"cannot split a {type(loader).__name__} among {world_size()} processes: "
                          "give a torch DataLoader over a map-style dataset")
    dataset = loader.dataset
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    generator = getattr(dataset, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed((seed * 1_000_003 + epoch) * 65_537 + rank())
    kept = {"collate_fn": loader.collate_fn, "num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
            "worker_init_fn": loader.worker_init_fn, "persistent_workers": loader.persistent_workers}
    loader_type = type(loader)  # a subclass (data.folders.ReadingLoader: worker errors in one line) is kept
    if loader.batch_size is None and isinstance(loader.sampler, BatchSampler):
        batches = BatchSampler(sampler, loader.sampler.batch_size, loader.sampler.drop_last)
        return loader_type(dataset, batch_size=None, sampler=batches, **kept)
    return loader_type(dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last, **kept)
