"""``QConfig``: how ``prepare`` quantizes (a frozen dataclass, validated on construction).

>>> QConfig(weight_bits=4, act_bits=4).bn_mode
'batch'
>>> QConfig(bn_mode="sometimes")
Traceback (most recent call last):
...
repq_fx.errors.ConfigError: QConfig.bn_mode must be one of 'batch', 'estimate', 'running'; got 'sometimes'
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError
from .targets import DEFAULT_TARGET, LEGACY_TARGET, get_target

QUANTIZERS = ("lsq", "minmax")
STEP_INITS = ("mse", "minmax")


class BnMode(str, enum.Enum):
    """How a BatchNorm inside a block normalizes in train mode (``QConfig.bn_mode``).

    A ``str``: ``QConfig`` takes the strings users write (``bn_mode="estimate"``) and each member
    equals its string (``str, Enum`` rather than Python 3.11's ``StrEnum``: setup.cfg allows 3.10).

    >>> BnMode("estimate") is BnMode.ESTIMATE, BnMode.BATCH == "batch", str(BnMode.BATCH), f"{BnMode.RUNNING}"
    (True, True, 'batch', 'running')
    """

    __str__ = str.__str__
    __format__ = str.__format__

    BATCH = "batch"  # RepQ-BN: exact batch statistics of each branch
    ESTIMATE = "estimate"  # RepQ-BNEst: estimated from the block input's moments
    RUNNING = "running"  # the running statistics (a frozen-BN phase)


BN_MODES = tuple(mode.value for mode in BnMode)


@dataclass(frozen=True, kw_only=True)
class QConfig:
    """Quantization settings of a RepQ model."""

    weight_bits: int = 8  # bits of the merged (deploy) weights, 2..8, symmetric per output channel
    act_bits: int = 8  # bits of activations, 2..8, per tensor, asymmetric (uint)
    weight_quantizer: str = "lsq"  # "lsq" (learned step) or "minmax" (current weight range)
    act_quantizer: str = "lsq"  # "lsq" (learned step) or "minmax" (EMA of observed ranges)
    step_init: str = "mse"  # where LSQ steps start: "mse" (least squared quantization error) or "minmax" (range)
    per_channel: bool = True  # per-output-channel weight scales (else one scale per layer)
    bn_mode: str = "batch"  # BN inside blocks in train mode: "batch" (RepQ-BN), "estimate" (RepQ-BNEst), "running"
    first_last_bits: int | None = 8  # bits of the first and last quantized layer; None: the common widths
    skip: tuple[str, ...] = ()  # module names (and everything under them) left in float
    target: str = DEFAULT_TARGET  # the runtime whose integer scheme is trained (repq_fx.targets.TARGETS)
    version: int = 2  # format version of this config in checkpoints (2: target)

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits"):
            _check_bits(name, getattr(self, name))
        if self.first_last_bits is not None:
            _check_bits("first_last_bits", self.first_last_bits)
        for name in ("weight_quantizer", "act_quantizer"):
            _check_choice(name, getattr(self, name), QUANTIZERS)
        _check_choice("bn_mode", self.bn_mode, BN_MODES)
        _check_choice("step_init", self.step_init, STEP_INITS)
        _check_target_widths(self)
        if not isinstance(self.per_channel, bool):
            raise ConfigError(f"QConfig.per_channel must be True or False; got {self.per_channel!r}")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ConfigError(f"QConfig.skip must be a tuple of module names; got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints.

        >>> QConfig.from_dict(QConfig(weight_bits=4).to_dict()) == QConfig(weight_bits=4)
        True
        """
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QConfig":
        """Inverse of :meth:`to_dict`. A version-1 config (written before ``target`` existed) gets the
        target whose grid it was trained on.

        >>> QConfig.from_dict({"weight_bits": 8, "version": 1}).target
        'onnxruntime-vnni'
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"QConfig has no field(s) {sorted(unknown)}; known: {sorted(known)}")
        values = dict(data)
        if values.get("version", 1) < 2 and "target" not in values:
            values["target"] = LEGACY_TARGET  # trained before targets: full-range int8 weights
            values["version"] = 2
        if "skip" in values:
            values["skip"] = tuple(values["skip"])
        return cls(**values)


def _check_target_widths(config: "QConfig") -> None:
    """The target exists and quantizes activations to the widths ``config`` trains (TensorRT: int8 only)."""
    target = get_target(config.target)
    widths = {config.act_bits} | ({config.first_last_bits} if config.first_last_bits is not None else set())
    if target.act_bits is not None and widths != {target.act_bits}:
        raise ConfigError(f"target {target.name!r} quantizes activations to {target.act_bits} bits only; got "
                          f"act_bits={config.act_bits}, first_last_bits={config.first_last_bits}. Train "
                          f"act_bits={target.act_bits} for it, or choose another target")


def _check_bits(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ConfigError(f"QConfig.{name} must be an integer from 2 to 8; got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"QConfig.{name} must be one of {allowed}; got {value!r}")
