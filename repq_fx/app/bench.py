"""Round-robin timing: several variants in one process, each run timed alone, summarized by medians.

The methodology of ``repq-fx bench`` and ``benchmarks/qat_step.py``: every variant is built in the
same process; after ``warmup`` untimed runs of each, every round runs each variant ``repeat`` times,
in an order that rotates from round to round (so no variant always runs right after the same
neighbour, or always first), and times each run alone. Compare variants by the ratio of medians
(:class:`Summary`), never by means: one stall on a shared machine moves a mean, not a median.

>>> calls = []
>>> times = round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2)
>>> calls, {name: len(t) for name, t in times.items()}
(['a', 'b', 'b', 'a'], {'a': 2, 'b': 2})
>>> summarize([4.0, 1.0, 3.0, 2.0]).median
2.5
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Summary", "TrainStep", "rotation", "round_robin", "summarize"]


def rotation(names: Sequence[str], r: int) -> list[str]:
    """The order in which round ``r`` runs ``names``: the list rotated left by ``r``.

    >>> rotation(["a", "b", "c"], 1)
    ['b', 'c', 'a']
    """
    k = r % len(names)
    return list(names[k:]) + list(names[:k])


def round_robin(runners: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 0, repeat: int = 1,
                clock: Callable[[], float] = time.perf_counter,
                on_round: Callable[[int, dict[str, list[float]]], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each run of each runner: ``rounds * repeat`` timings per name, in the order they ran.

    First ``warmup`` untimed calls of each runner (one runner after the other); then ``rounds`` rounds
    in :func:`rotation` order, each runner called ``repeat`` times in a row, each call timed alone
    with ``clock`` (``time.thread_time`` counts only the CPU time of this thread). ``on_round(r,
    times)`` is called after round ``r`` (0-based) with the timings so far, e.g. to show progress.

    >>> times = round_robin({"x": lambda: None}, rounds=3, warmup=1, repeat=2)
    >>> len(times["x"]), all(t >= 0 for t in times["x"])
    (6, True)
    """
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in rotation(names, r):
            run = runners[name]
            for _ in range(repeat):
                start = clock()
                run()
                times[name].append(clock() - start)
        if on_round is not None:
            on_round(r, times)
    return times


@dataclass(frozen=True)
class Summary:
    """Median, quartiles and minimum of a list of timings (seconds)."""

    median: float
    q1: float
    q3: float
    minimum: float
    count: int

    def ratio(self, base: Summary) -> float:
        """Ratio of medians, ``self / base``.

        >>> summarize([2.0, 2.0]).ratio(summarize([1.0, 1.0]))
        2.0
        """
        return self.median / base.median


def summarize(times: Sequence[float], method: str = "exclusive") -> Summary:
    """The :class:`Summary` of ``times``; quartiles by :func:`statistics.quantiles` with ``method``
    (``"inclusive"`` keeps them between the minimum and the maximum, also for a few timings; one
    timing: all equal).

    >>> s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    >>> s.median, s.q1, s.q3, s.minimum, s.count
    (3.0, 1.5, 4.5, 1.0, 5)
    >>> s = summarize([1.0, 2.0], method="inclusive")
    >>> s.q1, s.q3
    (1.25, 1.75)
    """
    if not times:
        raise ValueError("no timings to summarize")
    q1, _, q3 = statistics.quantiles(times, n=4, method=method) if len(times) > 1 else [times[0]] * 3
    return Summary(statistics.median(times), q1, q3, min(times), len(times))


class TrainStep:
    """One training step of ``module`` on a fixed batch: ``zero_grad(set_to_none=True)``, forward,
    ``loss(module(x), target)`` (cross-entropy by default), backward, SGD step (momentum 0.9).

    ``step.module`` and ``step.optimizer`` stay reachable (e.g. to size the optimizer state).

    >>> step = TrainStep(nn.Linear(4, 3), torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> step()
    >>> step.optimizer.state_dict()["state"][0]["momentum_buffer"].shape
    torch.Size([3, 4])
    """

    def __init__(self, module: nn.Module, x: torch.Tensor, target: torch.Tensor, lr: float = 1e-3,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> None:
        self.module, self.x, self.target, self.loss = module, x, target, loss
        self.optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(self.module(self.x), self.target).backward()
        self.optimizer.step()
