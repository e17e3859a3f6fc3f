"""Model specs: one string names a model, ``resolve_model`` builds it.

The command line (``repq-fx explain timm:repvgg_a0``) and the benchmarks name
models this way. A spec is ``PREFIX:NAME``; the prefix picks a resolver from
:data:`RESOLVERS`, and any other prefix is read as an importable module path:

- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)``
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None)``
- ``examples:NAME``: an example network of :data:`repq_fx.app.networks.NETWORKS`
  (``RepVGGNet``, ``QARepVGGNet``, ``ACResNet18``, ``DBBResNet18``, ``OREPAResNet18``,
  ``ResNet18``, ``ECBSR``; the classifiers take ``num_classes`` and ``in_channels``) or a class in
  :mod:`repq_fx.testing.blocks`
- ``package.module:Class``: ``Class()`` (or a function returning a module, or a module object)

Every model is built without downloading weights, and without arguments unless options are given
(timm, torchvision and example specs take them).

>>> resolve_model("examples:RepVGGNet").linear
Linear(in_features=128, out_features=10, bias=True)
>>> resolve_model("torch.nn:Identity")
Identity()
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ..errors import ModelSpecError

__all__ = ["ModelSpecError", "RESOLVERS", "SPEC_FORMS", "TAKES_OPTIONS", "resolve_model"]

SPEC_FORMS = "timm:NAME, torchvision:NAME, examples:NAME or package.module:Class"


def _timm(name: str, **options: Any) -> nn.Module:
    timm = _import("timm", "pip install 'repq_fx[timm]'")
    if not timm.is_model(name):
        raise ModelSpecError(f"timm has no model {name!r}{_did_you_mean(name, timm.list_models())}")
    return _with_options(lambda: timm.create_model(name, pretrained=False, **options), f"timm's {name}", options)


def _torchvision(name: str, **options: Any) -> nn.Module:
    models = _import("torchvision", "pip install torchvision").models
    if name not in models.list_models():
        raise ModelSpecError(f"torchvision has no model {name!r}{_did_you_mean(name, models.list_models())}")
    return _with_options(lambda: models.get_model(name, weights=None, **options), f"torchvision's {name}", options)


def _with_options(build: Callable[[], nn.Module], what: str, options: dict[str, Any]) -> nn.Module:
    try:
        return build()
    except TypeError as e:
        if not options:
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise ModelSpecError(f"{what} cannot be built with {given} ({e})") from None


def _examples(name: str, **options: Any) -> nn.Module:
    from ..testing import blocks
    from . import networks

    if name in networks.NETWORKS:
        return _with_options(lambda: networks.build_network(name, **options), f"the example network {name}", options)
    if name not in blocks.__all__ or not _is_module_class(getattr(blocks, name)):
        names = list(networks.NETWORKS) + [n for n in blocks.__all__ if _is_module_class(getattr(blocks, n))]
        raise ModelSpecError(f"examples:{name} names no example network or block{_did_you_mean(name, names)}")
    if options:
        return _with_options(lambda: getattr(blocks, name)(**options), f"the example block {name}", options)
    return _build(getattr(blocks, name), name)


# prefix -> function(NAME) -> nn.Module. Add an entry to teach the CLI a new model source.
RESOLVERS: dict[str, Callable[..., nn.Module]] = {
    "timm": _timm,
    "torchvision": _torchvision,
    "examples": _examples,
}


# the prefixes whose factories take options (``num_classes=10``, timm's ``in_chans=1``, ...)
TAKES_OPTIONS = ("timm", "torchvision", "examples")


def resolve_model(spec: str, **options: Any) -> nn.Module:
    """Build the model that ``spec`` names (see the module docstring for the forms).

    ``options`` go to the factory of a ``timm:``, ``torchvision:`` or ``examples:`` spec
    (``num_classes=10``, timm's ``in_chans=1``, an example network's ``in_channels=3``); other
    specs are built without arguments and take none.
    Raises :class:`ModelSpecError` (one line, naming what was wrong) for a malformed
    spec, an unknown model, a model that cannot be built without arguments, or options it refuses.

    >>> type(resolve_model("examples:RepVGGNet")).__name__
    'RepVGGNet'
    >>> resolve_model("examples:ResNet18", num_classes=3, in_channels=3).linear.out_features
    3
    """
    prefix, sep, name = spec.partition(":")
    if not sep or not prefix or not name:
        raise ModelSpecError(f"bad model spec {spec!r}: expected PREFIX:NAME; accepted forms: {SPEC_FORMS}")
    resolver = RESOLVERS.get(prefix)
    if options and prefix not in TAKES_OPTIONS:
        raise ModelSpecError(f"{spec} is built without arguments; only {', '.join(TAKES_OPTIONS)} specs take "
                             f"options such as {', '.join(options)}")
    try:
        if resolver is None:
            return _dotted(prefix, name)
        return resolver(name, **options) if options else resolver(name)
    except ModelSpecError as e:
        raise ModelSpecError(f"bad model spec {spec!r}: {e}; accepted forms: {SPEC_FORMS}") from None


# module paths of earlier versions, which checkpoints name in their model spec
MOVED_MODULES = {"repq_fx.examples.blocks": "repq_fx.testing.blocks", "repq_fx.examples.networks": "repq_fx.app.networks",
                 "repq_fx.cases": "repq_fx.testing.cases"}


def _dotted(module_path: str, attr: str) -> nn.Module:
    try:
        module = importlib.import_module(MOVED_MODULES.get(module_path, module_path))
    except ImportError as e:
        raise ModelSpecError(f"{module_path!r} is neither a known prefix ({', '.join(RESOLVERS)}) "
                             f"nor an importable module ({e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"module {module_path!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return _build(obj, attr)


def _build(obj: object, what: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelSpecError(f"{what} is a {type(obj).__name__}, not a model class or factory")
    try:
        model = obj()
    except TypeError as e:
        raise ModelSpecError(f"{what} cannot be built without arguments ({e})") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{what}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _import(name: str, hint: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ModelSpecError(f"{name} is not installed ({hint})") from None


def _is_module_class(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
