"""Fake quantizers: LSQ (learned step size) and min-max, for weights and activations.

Rounding and its gradients come from PyTorch's fused fake-quant ops
(``torch._fake_quantize_learnable_per_{channel,tensor}_affine`` for LSQ, with
gradient scale ``1/sqrt(N * Qp)``; ``torch.fake_quantize_per_{channel,tensor}_affine``
for min-max). Weights are symmetric signed per output channel; activations are
per tensor, unsigned with a zero point (what ONNX Runtime runs as uint8).

On the CPU, LSQ runs :func:`~repq_fx.quant.lsq.lsq_fake_quantize` instead: the same function
as the learnable fused ops, value for value, written with vectorized tensor ops (see ``lsq``).

All state is in buffers/parameters, so a state_dict round-trips the quantizer:
step sizes, zero points, observed ranges and the ``enabled``/``initialized`` flags.

The flags also have Python-bool mirrors (``_flags``), kept equal to the buffers by every method
that changes them (:meth:`_FakeQuant.enable`, ``reset``, initialisation, ``set_observing``, and
``load_state_dict``). Eager code reads the buffers, as always; code being compiled by
``torch.compile`` reads the mirrors, so that Dynamo guards on a Python value (and recompiles if
it changes) where ``bool(buffer)`` would be a ``.item()`` and a graph break. Change the flags
through those methods, not by writing to the buffers, or a compiled model will not see it.

A learned step starts where the squared quantization error is smallest (``init="mse"``, see
:mod:`repq_fx.quant.range_init`) or at the full range (``init="minmax"``):

>>> w = torch.tensor([[1.0, -0.5], [0.25, 0.1]])
>>> WeightFakeQuant(bits=4, channels=2, init="minmax")(w).detach()   # step max|w| / 7 per channel
tensor([[ 1.0000, -0.4286],
        [ 0.2500,  0.1071]])
>>> WeightFakeQuant(bits=4, channels=2)(w).detach()                  # MSE: less squared error per row
tensor([[ 0.9700, -0.5543],
        [ 0.2475,  0.1061]])
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from ..config import STEP_INITS
from ..errors import ConfigError, StepCollapsedWarning
from . import zero_range
from .lsq import lsq_fake_quantize
from .precision import autocast_active, to_float32
from .range_init import mse_affine_range, mse_symmetric_scale

STEP_FLOOR = torch.finfo(torch.float32).eps  # a learned step is never below this (see _keep_step_positive)
SAMPLES_PER_BATCH = 1 << 16  # activation values kept per observed batch for the MSE search
MAX_SAMPLES = 1 << 19


class _FakeQuant(nn.Module):
    """Shared state: bit width, on/off switch, initialisation flag."""

    _version = 2  # 2: the integer grid is a buffer (quant_range)

    def __init__(self, bits: int, quant_min: int, quant_max: int, channels: int, learned: bool,
                 init: str = "mse") -> None:
        super().__init__()
        if init not in STEP_INITS:
            raise ConfigError(f"init must be one of {STEP_INITS}; got {init!r}")
        self.bits, self.quant_min, self.quant_max, self.learned = bits, quant_min, quant_max, learned
        self.init = init
        scale = torch.ones(channels)
        if learned:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.register_buffer("enabled", torch.tensor(1, dtype=torch.uint8))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        # The grid is state too: a checkpoint trained at other bit widths must not load silently.
        self.register_buffer("quant_range", torch.tensor([quant_min, quant_max], dtype=torch.int32))
        # Python mirrors of the flag buffers, read by compiled code (see the module docstring)
        self._flags = {"enabled": True, "initialized": False, "observing": False}
        self.zero_range = False  # the whole step came from no range (see zero_range.py); not state

    def _flag(self, name: str) -> bool:
        """The flag buffer ``name`` as a bool: its value in eager mode, its Python mirror under
        ``torch.compile`` (a guard, not a graph break)."""
        if torch.compiler.is_compiling():
            return self._flags[name]
        return bool(getattr(self, name))

    def _set_flag(self, name: str, on: bool) -> None:
        getattr(self, name).fill_(int(on))
        self._flags[name] = bool(on)

    def _sync_flags(self) -> None:
        """Mirrors from the buffers (after a state_dict load)."""
        for name in self._flags:
            buf = getattr(self, name, None)
            if isinstance(buf, torch.Tensor):
                self._flags[name] = bool(buf)

    def __setstate__(self, state: dict) -> None:  # a module pickled before the mirrors existed
        super().__setstate__(state)
        self.__dict__.setdefault("init", "minmax")  # pickled before step_init: its steps were min-max
        self.__dict__.setdefault("zero_range", False)
        if "_flags" not in self.__dict__:
            self._flags = {"enabled": True, "initialized": False, "observing": False}
            self._sync_flags()

    def set_grid(self, bits: int, quant_min: int, quant_max: int) -> None:
        """Change the bit width and integer range (before any data is seen)."""
        self.bits, self.quant_min, self.quant_max = bits, quant_min, quant_max
        self.quant_range.copy_(torch.tensor([quant_min, quant_max], dtype=torch.int32))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[override]
                              unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version")
        if (version is None or version < 2) and prefix + "quant_range" not in state_dict:
            # written before the grid was state (as BatchNorm does for num_batches_tracked)
            state_dict[prefix + "quant_range"] = self.quant_range.clone()
        saved = state_dict.get(prefix + "quant_range")
        if saved is not None and saved.tolist() != [self.quant_min, self.quant_max]:
            lo, hi = (int(v) for v in saved.tolist())
            error_msgs.append(
                f"{prefix[:-1] or 'quantizer'}: the checkpoint was trained on the grid [{lo}, {hi}] "
                f"({(hi - lo + 1).bit_length() - 1} bits) but this model quantizes to [{self.quant_min}, "
                f"{self.quant_max}] ({self.bits} bits); prepare the model with the checkpoint's QConfig "
                "(its bit widths and target)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._sync_flags()

    def enable(self, on: bool = True) -> None:
        self._set_flag("enabled", on)

    def _keep_step_positive(self) -> None:
        """A learned step that an optimizer step pushed to or below zero is clamped to :data:`STEP_FLOOR`
        (as torch.ao's learnable fake quant does: a negative step would flip the grid) and, in eager
        mode on the CPU (where reading it costs nothing), reported with a :class:`StepCollapsedWarning`
        naming the quantizer. ``lower`` warns about a step at the floor on every device, and names it as
        the cause when a bias then overflows int32."""
        with torch.no_grad():
            if self.scale.device.type == "cpu" and not torch.compiler.is_compiling():
                smallest = float(self.scale.min())
                if smallest <= 0 and not getattr(self, "_collapse_reported", False):
                    self._collapse_reported = True  # once per quantizer: a training loop would repeat it each step
                    warnings.warn(collapse_message(self, f"was pushed to {smallest:.3g} by an optimizer step "
                                                         "and is held at the floor") +
                                  " (said once for this quantizer; lower() lists every step at the floor)",
                                  StepCollapsedWarning, stacklevel=4)
            self.scale.clamp_(min=STEP_FLOOR)

    def reset(self) -> None:
        """Forget the step: it is set again from the next data (or weights) seen."""
        self._set_flag("initialized", False)
        self.zero_range = False

    def _step_with_range(self, scale: torch.Tensor, unit_step: float) -> torch.Tensor:
        """A learned ``scale`` whose steps below :data:`STEP_FLOOR` (data without a range) are replaced by the
        median of the others, or, where the whole tensor had none, kept as they are if already set so
        (``calibrate`` sets the median step of the model's other quantizers) or ``unit_step``; reported once
        (:mod:`.zero_range`). A whole tensor without a range leaves :attr:`zero_range` set: the step is
        then set again from the data of every forward until the data has a range, as an observer would."""
        if not self.learned or torch.compiler.is_compiling():
            return scale
        was_zero = self.zero_range
        if was_zero and not bool((scale >= STEP_FLOOR).any()):
            return self.scale.detach().to(scale.device, torch.float32).reshape(scale.shape)
        filled, count = zero_range.fill_steps(scale, STEP_FLOOR, unit_step)
        self.zero_range = count == scale.numel()
        if count and not was_zero:
            what = ("all values" if scale.numel() == 1 else f"all {count} channels" if count == scale.numel()
                    else f"{count} of {scale.numel()} channels")
            zero_range.report(getattr(self, "path", "") or type(self).__name__, f"{what} zero")
        return filled


class WeightFakeQuant(_FakeQuant):
    """Symmetric signed fake quant of a weight, per output channel (``channels`` scales) or per tensor.

    LSQ: the step is a parameter, set the first time a weight is seen: the MSE step of that
    weight (``init="mse"``) or its range (``init="minmax"``). Min-max: the step follows the
    current weight range at every call.
    """

    def __init__(self, bits: int, channels: int, learned: bool = True, per_channel: bool = True,
                 init: str = "mse") -> None:
        super().__init__(bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, channels if per_channel else 1, learned,
                         init)
        self.per_channel = per_channel

    def set_bits(self, bits: int) -> None:
        """Another bit width (the first and last layers of ``prepare``).

        >>> q = WeightFakeQuant(bits=4, channels=1); q.set_bits(8); q.quant_range.tolist()
        [-128, 127]
        """
        self.set_grid(bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)

    def _range_scale(self, w: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, w.dim())) if self.per_channel else tuple(range(w.dim()))
        amax = w.detach().abs().amax(dim=dims) if w.numel() else torch.ones(1)
        return (amax / self.quant_max).clamp_min(torch.finfo(torch.float32).tiny).float().reshape(-1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if autocast_active(w.device.type):  # the grid does not follow the compute dtype (quant/precision.py)
            with torch.autocast(w.device.type, enabled=False):
                return self._quantize(to_float32(w))
        return self._quantize(w)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        if not self.learned or not self._flag("initialized") or self.zero_range:
            with torch.no_grad():
                if self.learned and self.init == "mse" and w.numel():
                    scale = mse_symmetric_scale(w, self.quant_min, self.quant_max, self.per_channel)
                else:
                    scale = self._range_scale(w)
                scale = self._step_with_range(scale, 1.0 / self.quant_max)  # unit step: the grid spans [-1, 1]
                self.scale.copy_(scale.to(self.scale.device))
                self._set_flag("initialized", True)
        if not self._flag("enabled"):
            return w
        if self.learned:
            self._keep_step_positive()
            grad_factor = 1.0 / math.sqrt(w[0].numel() * self.quant_max) if w.numel() else 1.0
            y = lsq_fake_quantize(w.float(), self.scale.float(), None, self.quant_min,  # symmetric
                                  self.quant_max, grad_factor)
            return y.to(w.dtype)
        zp = self.zero_point.to(torch.int32)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(w, self.scale.float(), zp, 0, self.quant_min, self.quant_max)
        return torch.fake_quantize_per_tensor_affine(w, self.scale.float(), zp, self.quant_min, self.quant_max)


class ActFakeQuant(_FakeQuant):
    """Per-tensor unsigned fake quant of an activation, ``[0, 2^bits - 1]`` with a zero point; or, with
    ``signed`` (a target with symmetric activations: TensorRT), ``[-2^(bits-1), 2^(bits-1) - 1]`` with
    the zero point fixed at 0, where LSQ learns only the step.

    While ``observing`` (see ``repq_fx.calibrate``) it records the range and passes values through.
    LSQ learns the step after initialisation from the observed data (or the first batch): the MSE
    step over a strided sample of the observed values (``init="mse"``) or the range (``"minmax"``).
    Min-max keeps an exponential moving average of the range in train mode.
    """

    def __init__(self, bits: int, learned: bool = True, averaging_constant: float = 0.01,
                 init: str = "mse", signed: bool = False) -> None:
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        super().__init__(bits, lo, hi, 1, learned, init)
        self.averaging_constant = averaging_constant
        self._samples: list[torch.Tensor] = []  # observed values for the MSE search (not state)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("observing", torch.tensor(0, dtype=torch.uint8))

    @property
    def symmetric(self) -> bool:
        """A signed grid, zero point 0 (read from the grid, so a checkpoint's grid decides).

        >>> ActFakeQuant(8, signed=True).symmetric, ActFakeQuant(8).quant_range.tolist()
        (True, [0, 255])
        """
        return self.quant_min < 0

    def observe(self, x: torch.Tensor, average: bool = False) -> None:
        """Widen (or, with ``average``, move towards) the recorded range with ``x``'s min and max."""
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if average:  # a moving average once a range was recorded (no branch on data: torch.compile)
            c, seen = self.averaging_constant, torch.isfinite(self.min_val)
            self.min_val.copy_(torch.where(seen, self.min_val + c * (lo - self.min_val),
                                           torch.minimum(self.min_val, lo)))
            self.max_val.copy_(torch.where(seen, self.max_val + c * (hi - self.max_val),
                                           torch.maximum(self.max_val, hi)))
        else:
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))
            if self.learned and self.init == "mse":
                self._keep_sample(x)

    def __setstate__(self, state: dict) -> None:  # pickled before the MSE samples existed
        super().__setstate__(state)
        self.__dict__.setdefault("_samples", [])

    def _keep_sample(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        self._samples.append(flat[::max(1, flat.numel() // SAMPLES_PER_BATCH)].clone())
        if sum(s.numel() for s in self._samples) > MAX_SAMPLES:
            self._samples = [s[::2] for s in self._samples]

    def reset(self) -> None:
        super().reset()
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self._samples = []

    def init_from_range(self) -> None:
        """Step and zero point that map the recorded range (widened to include 0) onto the grid; on a
        symmetric grid, the step that maps the larger of ``|min|`` and ``max`` onto ``quant_max``
        (or, ``init="mse"``, the MSE step over that range), zero point 0."""
        lo = torch.clamp(self.min_val, max=0.0)
        hi = torch.clamp(self.max_val, min=0.0)
        if self.symmetric:
            scale, zero_point = self._symmetric_step(lo, hi), torch.tensor(0.0)
        elif self.learned and self.init == "mse" and self._samples:
            step, zp = mse_affine_range(torch.cat(self._samples), float(lo), float(hi), self.quant_min,
                                        self.quant_max)
            scale, zero_point = torch.tensor(step), torch.tensor(float(zp))
        else:
            scale = ((hi - lo) / (self.quant_max - self.quant_min)).clamp_min(1e-8)
            zero_point = torch.clamp(self.quant_min - torch.round(lo / scale), self.quant_min, self.quant_max)
        self._samples = []
        if self.learned and not torch.compiler.is_compiling() and not float(scale) >= STEP_FLOOR:
            # no range: a grid centred on 0 (the sign of what comes is unknown), of a unit range's step
            scale = self._step_with_range(scale.reshape(1).float(), 1.0 / (self.quant_max - self.quant_min))
            zero_point = torch.tensor(float((self.quant_min + self.quant_max + 1) // 2))
        elif self.zero_range:  # the first data with a range after data without
            self.zero_range = False
        with torch.no_grad():
            self.scale.copy_(scale.reshape(1))
            self.zero_point.copy_(zero_point.reshape(1))
        self._set_flag("initialized", True)

    def _symmetric_step(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        if self.learned and self.init == "mse" and self._samples:
            # the recorded extremes join the sample, so the search starts from the whole range
            values = torch.cat([*self._samples, lo.reshape(1).float(), hi.reshape(1).float()]).reshape(1, -1)
            return mse_symmetric_scale(values, self.quant_min, self.quant_max, per_channel=False).reshape(())
        return (torch.maximum(-lo, hi) / self.quant_max).clamp_min(1e-8)

    def set_observing(self, on: bool = True) -> None:
        """Record ranges and pass values through (``repq_fx.calibrate``), or stop."""
        self._set_flag("observing", on)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if autocast_active(x.device.type):  # float32 values on the grid (quant/precision.py)
            with torch.autocast(x.device.type, enabled=False):
                return self._quantize(to_float32(x))
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self._flag("observing"):
            self.observe(x)
            return x
        initialized = self._flag("initialized")
        if not initialized or (not self.learned and self.training) or self.zero_range:
            with torch.no_grad():
                self.observe(x, average=initialized and not self.zero_range)
                self.init_from_range()
        if not self._flag("enabled"):
            return x
        if self.learned:
            self._keep_step_positive()
            grad_factor = 1.0 / math.sqrt(x.numel() * self.quant_max) if x.numel() else 1.0
            zero_point = None if self.symmetric else self.zero_point.float()  # symmetric: only the step learns
            y = lsq_fake_quantize(x.float(), self.scale.float(), zero_point, self.quant_min, self.quant_max,
                                  grad_factor)
            return y.to(x.dtype)
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale.float(), self.zero_point.to(torch.int32), self.quant_min, self.quant_max)


def collapse_message(quantizer: _FakeQuant, event: str, path: str | None = None) -> str:
    """Why a learned step at :data:`STEP_FLOOR` breaks its layer and what to do; ``event``: what happened.

    >>> q = WeightFakeQuant(bits=4, channels=3); q.path = "stem.weight_fake_quant"
    >>> q.scale.data[:2] = STEP_FLOOR
    >>> print(collapse_message(q, "is at the floor"))   # doctest: +ELLIPSIS
    stem.weight_fake_quant: the learned step of 2 of 3 channels is at the floor (1.19e-07), so ...
    """
    path = path or getattr(quantizer, "path", "") or type(quantizer).__name__
    if quantizer.scale.numel() > 1:
        low = int((quantizer.scale.detach() <= STEP_FLOOR).sum())
        where = f"{max(low, 1)} of {quantizer.scale.numel()} channels"
    else:
        where = "the tensor"
    return (f"{path}: the learned step of {where} {event} ({STEP_FLOOR:.3g}), so every value there quantizes "
            "to an end of the grid. An optimizer update was larger than the step itself (a step cannot go "
            "below zero): lower the learning rate of the steps (parameters named '...fake_quant.scale'), "
            "and calibrate in the mode you train in (repq_fx.calibrate on the model in train mode)")


def fake_quantizers(model: nn.Module) -> list[_FakeQuant]:
    """Every fake quantizer inside ``model``."""
    return [m for m in model.modules() if isinstance(m, _FakeQuant)]
