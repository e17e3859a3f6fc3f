"""One error hierarchy for everything repq_fx raises on purpose.

Every message names what went wrong and what to do about it. Internal invariants
raise ``AssertionError`` explicitly; user input never meets a bare ``assert``.
"""
from __future__ import annotations

from collections.abc import Sequence


class RepQError(Exception):
    """Base class of every error repq_fx raises on purpose."""


class CaptureError(RepQError):
    """The model could not be captured as a graph (FX tracing failed)."""


class UnsupportedOpError(RepQError):
    """An operation has no rule in one of repq_fx's registries."""


class ConfigError(RepQError, ValueError):
    """A configuration value is invalid; the message names the field."""


class ModelSpecError(RepQError, ValueError):
    """A model spec is malformed or names no model; the message says which and lists the accepted forms."""


class NotPreparedError(RepQError):
    """An operation needs a model returned by ``repq_fx.prepare``."""


class DataError(RepQError):
    """A data set is missing or unreadable; the message names the file and how to get it."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The files of a data set are not where they were looked for; the message says how to install them."""


class CorruptDataError(DataError, ValueError):
    """A data file exists but its contents are not what its format promises (truncated, wrong header, ...)."""


class CheckpointError(RepQError):
    """A checkpoint is unreadable, or does not match the model or run it is loaded into."""


class NotCalibratedError(RepQError):
    """A prepared model has quantizers that never saw data (or are switched off) where it matters."""


class ExportError(RepQError):
    """A lowered graph holds an operation the ONNX exporter has no rule for."""


class SaturationError(ExportError):
    """Integer weights the target runtime's kernels cannot compute exactly (16-bit pair sums overflow)."""


class ExportCheckError(ExportError):
    """The exported file, run in its runtime, disagrees with the lowered PyTorch model."""


class CompileError(RepQError):
    """``compile_int8`` cannot run the lowered model as int8 kernels here (no TorchAO, no oneDNN, not x86), or
    inductor left an integer layer as a float convolution."""


class AlreadyPreparedError(RepQError):
    """The model already carries fake quantizers (``repq_fx.prepare`` or ``torch.ao.quantization``)."""


class InvalidModelError(RepQError, ValueError):
    """The model cannot be used as it is (e.g. uninitialized lazy parameters); the message says what to do."""


class NonFiniteError(InvalidModelError):
    """NaN or Inf in a parameter or BN statistic (or a negative running variance); the message names it."""


class RegistrationError(RepQError, TypeError):
    """A rule, op or label registered with a key or value the registry cannot use; the message says which."""


class RepQWarning(UserWarning):
    """Base class of every warning repq_fx gives on purpose (filter them all with this class)."""


class TrainingBranchWarning(RepQWarning):
    """``prepare``: the model's forward takes another path in train mode than in eval mode (beyond BatchNorm and
    dropout), which one graph cannot follow; the eval-mode path was captured. The message names where."""


class ZeroRangeWarning(RepQWarning):
    """``calibrate``: a quantizer saw only zeros, so its data gives no step; the message names it and the step used."""


class StepCollapsedWarning(RepQWarning):
    """A learned quantization step was pushed to or below zero by training and is held at the floor."""


def first_few(items: Sequence[object], shown: int = 3) -> str:
    """The first ``shown`` of ``items``, ``; ``-separated, and how many more there are, for messages.

    >>> first_few(["a", "b", "c", "d", "e"]), first_few([1])
    ('a; b; c; and 2 more', '1')
    """
    more = f"; and {len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(str(item) for item in items[:shown]) + more


def first_line(error: BaseException | None) -> str:
    """The first line of an exception's message (its type's name if it has none), for messages that quote it.

    >>> first_line(ValueError("bad size\\nat line 3")), first_line(KeyError())
    ('bad size', 'KeyError')
    """
    text = str(error).strip() if error is not None else ""
    return text.splitlines()[0] if text else type(error).__name__
