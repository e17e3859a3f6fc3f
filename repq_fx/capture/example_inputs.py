"""Example inputs for a capture: the ones given, or one made up from the channel count the model reads first.

>>> [tuple(t.shape) for t in batched_example((torch.zeros(1, 3), torch.zeros(4, 3)))]
[(2, 3), (4, 3)]
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import CaptureError, first_line

_PROBE_SIZE = 64  # spatial size of made-up example inputs
_MAX_PROBES = 8  # channel counts tried for a made-up input


def batched_example(example: tuple) -> tuple:
    """Examples with a batch of at least 2: torch.export fixes a dimension of size 1 (it specializes it)."""
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 else x
                 for x in example)


def example_inputs_for(model: nn.Module, example_inputs: Sequence[Any] | None) -> tuple[Any, ...]:
    """``example_inputs`` as a tuple, or a made-up ``(2, C, 64, 64)`` input (see :func:`input_channels`).

    >>> example_inputs_for(nn.Sequential(nn.ReLU(), nn.Conv2d(5, 8, 3)), None)[0].shape
    torch.Size([2, 5, 64, 64])
    """
    if example_inputs is not None:
        return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.get_default_dtype()
    device = params[0].device if params else torch.device("cpu")
    return (_made_up_input(input_channels(model), dtype, device),)


def _made_up_input(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, channels, _PROBE_SIZE, _PROBE_SIZE, generator=g, dtype=dtype).to(device)


class _ChannelsFound(Exception):
    """Ends a probe forward pass at the first op that fixes the channel count of what it reads."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.channels = channels


def _channels_read(func: Any, args: tuple, kwargs: dict) -> int | None:
    """The channel count ``func`` requires of its first argument (convolutions and norms), or ``None``."""
    def arg(i: int, name: str) -> Any:
        return args[i] if len(args) > i else kwargs.get(name)

    if func in (F.conv1d, F.conv2d, F.conv3d):
        groups = arg(6, "groups") or 1
        return int(arg(1, "weight").shape[1]) * int(groups)
    if func in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
        return int(arg(1, "weight").shape[0])
    if func in (F.batch_norm, F.instance_norm):
        for i, name in ((1, "running_mean"), (3, "weight")):
            t = arg(i, name)
            if isinstance(t, torch.Tensor):
                return t.numel()
    if func is F.group_norm and isinstance(arg(2, "weight"), torch.Tensor):
        return arg(2, "weight").numel()
    return None


class _ChannelProbe(TorchFunctionMode):
    """Follows the tensors computed from the probe input through a forward pass; stops at the first
    convolution or norm that reads one of them, with the channel count it requires."""

    def __init__(self, probe: torch.Tensor) -> None:
        super().__init__()
        self._kept = [probe]  # alive for the pass, so that their ids stay theirs
        self._ids = {id(probe)}

    def _mark(self, t: torch.Tensor) -> None:
        self._kept.append(t)
        self._ids.add(id(t))

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        from_probe = any(id(a) in self._ids for a in inputs)
        if from_probe and id(inputs[0]) in self._ids:
            channels = _channels_read(func, args, kwargs)
            if channels is not None:
                raise _ChannelsFound(channels)
        out = func(*args, **kwargs)
        if from_probe:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._mark(t)
            name = getattr(func, "__name__", "")
            if args and isinstance(args[0], torch.Tensor) and (name.endswith("_") or name == "__setitem__"):
                self._mark(args[0])  # written in place with values from the probe
        return out


def input_channels(model: nn.Module) -> int:
    """The channel count of the input of ``model`` (an image model), found by running it.

    A deep copy runs in eval mode on made-up ``(2, C, 64, 64)`` inputs, the candidates ``C`` taken from
    the model's convs and conv-shaped parameters (then 3 and 1), until a pass reaches the first
    convolution or norm that reads the input (or something computed from it) or ends: that op says
    how many channels it takes. The first conv in registration order is no guide: OREPA's first
    kernel is ``[O, I/groups, k, k]``, a ResNet may register a projection shortcut first.
    Raises :class:`CaptureError` asking for ``example_inputs`` when no candidate runs.

    >>> class Stem(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.shortcut, self.stem = nn.Conv2d(16, 32, 1), nn.Conv2d(3, 16, 3)
    ...     def forward(self, x):
    ...         return self.shortcut(self.stem(x))
    >>> input_channels(Stem())
    3
    """
    candidates: list[int] = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            candidates.append(int(m.in_channels))
    candidates += [int(p.shape[1]) for p in model.parameters() if p.dim() == 4 and p.is_floating_point()]
    candidates = list(dict.fromkeys(candidates + [3, 1]))[:_MAX_PROBES]
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.get_default_dtype()
    device = params[0].device if params else torch.device("cpu")
    probe_model = copy.deepcopy(model).eval()
    failures = []
    for c in candidates:
        x = _made_up_input(c, dtype, device)
        try:
            with torch.no_grad(), _ChannelProbe(x):
                probe_model(x)
        except _ChannelsFound as found:
            return found.channels
        except Exception as e:  # this size does not get through the ops before the first conv
            failures.append(f"C={c}: {type(e).__name__}: {first_line(e)}")
            continue
        return c  # the whole forward ran without any op that fixes the channel count
    tried = "; ".join(failures[:3]) + ("; ..." if len(failures) > 3 else "")
    raise CaptureError(
        f"capturing {type(model).__name__} with torch.export needs example_inputs: made-up inputs "
        f"(2, C, {_PROBE_SIZE}, {_PROBE_SIZE}) do not run it ({tried}).\n"
        "What to do: pass example_inputs=(x,) with x a real input of the model (a batch of one is fine).")


def unfilled_arguments(model: nn.Module, num_inputs: int) -> list[str]:
    """Parameters of ``model.forward`` that ``num_inputs`` positional inputs leave at their defaults."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in positional[num_inputs:]]
