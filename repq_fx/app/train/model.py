"""The model a run trains: the float model of the spec fitted to the data (classes, channels), checked
to run on it, and its quantized form for the run's method.

>>> input_channels(float_model(TrainConfig(model="examples:RepVGGNet")))
1
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ...errors import CheckpointError, ConfigError, RepQError
from .config import TrainConfig, _example_task


def build_model(config: TrainConfig, float_state: dict[str, Tensor] | None = None, *,
                sync_bn: bool = False) -> nn.Module:
    """The module a run trains: the float model (with ``float_state`` loaded, if given), or its
    quantized form for the config's method (see the module docstring). Not calibrated.
    ``sync_bn``: BNs normalize with the statistics of the global batch in a process group: ``fp``
    converts them to ``nn.SyncBatchNorm`` (same state_dict keys), quantized methods mark the prepared
    model's BNs (:func:`repq_fx.quant.sync_stats.mark_sync_batch_norm`; DDP refuses SyncBatchNorm on the CPU).

    >>> build_model(TrainConfig(model="examples:RepVGGNet", method="lsq")).__class__.__name__
    'GraphModule'
    """
    import repq_fx

    model = float_model(config)
    if float_state is not None:
        _load_state(model, float_state, config.from_ckpt or "the float checkpoint")
    if not config.quantized:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model
    if config.method in ("lsq", "ptq"):
        model = repq_fx.merge(model.eval())
    qmodel = repq_fx.prepare(model, config.qconfig())
    if sync_bn:
        from ...quant.sync_stats import mark_sync_batch_norm

        mark_sync_batch_norm(qmodel)
    return qmodel.train()


FASHION_MNIST_CLASSES, FASHION_MNIST_SIZE = 10, (1, 28, 28)

# prefix -> the factory options that build a classifier of `classes` classes on `channels`-channel images;
# specs of other prefixes are built without arguments and must fit as they are
FIT_OPTIONS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "timm": lambda classes, channels: {"num_classes": classes, "in_chans": channels},
    "torchvision": lambda classes, channels: {"num_classes": classes},  # 3 channels: grey is repeated
    "examples": lambda classes, channels: {"num_classes": classes, "in_channels": channels},
}


def fit_options(config: TrainConfig) -> dict[str, Any]:
    """The options ``config.model``'s factory gets to fit the data (:data:`FIT_OPTIONS`): the data's
    number of classes and channels for timm, torchvision and example classification networks; none
    for other specs, for SR data, and for checkpoints written before ``fit_data``.

    >>> fit_options(TrainConfig(model="timm:repvgg_a0", data="imagefolder:pets", classes=("cat", "dog")))
    {'num_classes': 2, 'in_chans': 3}
    >>> fit_options(TrainConfig(model="examples:ECBSR", data="sr"))
    {}
    """
    from ..data.kinds import data_shape

    prefix = config.model.partition(":")[0]
    if not config.fit_data or prefix not in FIT_OPTIONS:
        return {}
    if prefix == "examples" and _example_task(config.model) != "classification":
        return {}  # block classes and the SR network are built as they are
    classes, size = data_shape(config)
    return {} if classes is None else FIT_OPTIONS[prefix](classes, size[0])


def _data_label(config: TrainConfig) -> str:
    return "Fashion-MNIST" if config.data == "fashion-mnist" else config.data


def float_model(config: TrainConfig) -> nn.Module:
    """The float model of ``config.model``, fitted to the data.

    With ``fit_data`` (the default) on classification data a timm spec is built with the data's
    ``num_classes`` and ``in_chans``, a torchvision spec with ``num_classes`` (its grey input is
    repeated to the 3 channels it takes, see :func:`data_note`), an example network with
    ``num_classes`` and ``in_channels`` (:func:`fit_options`); any model must then map a batch of
    the data's images (3 channels when the data is grey and its first conv takes 3) to as many
    logits as there are classes, or :class:`~repq_fx.errors.ConfigError` says why it cannot train
    on the data. Checkpoints written before ``fit_data`` rebuild the factory's defaults (1000
    classes, 3 channels).

    >>> float_model(TrainConfig(model="examples:RepVGGNet")).linear.out_features
    10
    >>> net = float_model(TrainConfig(model="examples:RepVGGNet", data="imagefolder:pets", classes=("cat", "dog")))
    >>> net.linear.out_features, net.stages[0][0].in_channels
    (2, 3)
    """
    from ..data.kinds import data_shape
    from ..models import resolve_model

    options = fit_options(config)
    try:
        model = resolve_model(config.model, **options)
    except RepQError as e:
        classes, size = data_shape(config)
        raise ConfigError(f"{e}; {config.model} cannot be fitted to the {classes} classes of "
                          f"{'x'.join(map(str, size))} images of {_data_label(config)}") from None
    if config.fit_data and config.task == "classification":
        _check_fits(model, config)
    return model


def _check_fits(model: nn.Module, config: TrainConfig) -> None:
    """``model`` maps 2 of the data's images to ``[2, classes]`` logits, or a ConfigError says why not."""
    from ..data.kinds import data_shape

    classes, (channels, h, w) = data_shape(config)
    spec, label = config.model, _data_label(config)
    takes = input_channels(model)
    if takes is not None and takes != channels and not (channels == 1 and takes == 3):
        hint = ("pass --input-size 1xHxW to train on grey images" if takes == 1 else
                "give it a first conv of 1 or 3 channels")
        raise ConfigError(f"{spec}'s first conv takes {takes} channel{'s' * (takes != 1)}; the images of {label} "
                          f"have {channels}: {hint}")
    channels = takes or channels
    x = torch.zeros(2, channels, h, w)
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = "pick a model that takes small images" if config.data == "fashion-mnist" else \
            f"pick another --input-size or a model that takes {h}x{w} images"
        raise ConfigError(f"{spec} cannot run on {label}'s {channels}x{h}x{w} images ({type(e).__name__}: "
                          f"{first}); {hint}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, classes):
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"{spec} maps a batch of 2 {label} images to {shape}, not [2, {classes}] logits: give it "
                          f"a {classes}-class head (a model built without arguments keeps its own; timm, torchvision "
                          f"and example network specs get num_classes={classes})")


def data_note(config: TrainConfig) -> str | None:
    """What fitting the model to the data changed, for the run's log (None if nothing, or if an
    example network is built as registered, for Fashion-MNIST).

    >>> data_note(TrainConfig(model="torchvision:resnet18"))
    'note: torchvision:resnet18 built with num_classes=10 for Fashion-MNIST; its first conv takes 3 channels, so each grey image is repeated 3 times'
    >>> data_note(TrainConfig(model="examples:RepVGGNet", data="imagefolder:/pets", classes=("cat", "dog")))
    'note: examples:RepVGGNet built with num_classes=2, in_channels=3 for imagefolder:/pets (classes: cat, dog)'
    """
    from ..data.kinds import data_shape

    prefix = config.model.partition(":")[0]
    if not config.fit_data and config.data == "fashion-mnist" and prefix in ("timm", "torchvision"):
        return (f"note: {config.model} as its factory builds it (a checkpoint from before fit_data); grey images "
                "are repeated to its input channels")
    options = fit_options(config)
    if not options or (prefix == "examples" and config.data == "fashion-mnist"):
        return None
    note = f"note: {config.model} built with {', '.join(f'{k}={v}' for k, v in options.items())} for " \
           f"{_data_label(config)}"
    if config.classes:
        shown = ", ".join(config.classes[:8]) + (", ..." if len(config.classes) > 8 else "")
        note += f" (classes: {shown})"
    if prefix == "torchvision" and data_shape(config)[1][0] == 1:
        note += "; its first conv takes 3 channels, so each grey image is repeated 3 times"
    return note


def _load_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        detail = "; ".join(lines)[:600]
        raise CheckpointError(f"{source} does not fit this model ({detail}); was it written for another "
                              "model or method?") from None


def input_channels(model: nn.Module) -> int | None:
    """``in_channels`` of the first conv module (None if there is none).

    >>> input_channels(nn.Sequential(nn.Conv2d(3, 4, 1)))
    3
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _channel_adapter(config: TrainConfig) -> Callable[[Tensor], Tensor] | None:
    """Grey images into a model whose first conv wants 3 channels (torchvision, or a model built without
    arguments): repeat them."""
    from ..data.kinds import data_shape

    if config.task != "classification" or data_shape(config)[1][0] != 1:
        return None
    if input_channels(float_model(config)) == 3:
        return lambda x: x.expand(-1, 3, -1, -1)
    return None
