"""Checks on the model handed to ``explain`` / ``merge`` / ``prepare``, before anything is computed.

Each check raises a :class:`~repq_fx.errors.RepQError` subclass whose message names the problem
and says what to do, instead of a stack trace from inside FX or a silently wrong model:

- :func:`check_model`: already prepared (by repq_fx or ``torch.ao.quantization``), or with
  uninitialized lazy parameters; :func:`unwrap_parallel`: the model inside ``DataParallel``/DDP;
- :func:`non_finite` / :func:`check_finite`: NaN/Inf in a parameter, a BN statistic or any tensor a
  block's merged weight is computed from, and negative BN running variances;

>>> import torch.nn as nn
>>> check_model(nn.Conv2d(3, 8, 3), "merge")
>>> bad = nn.Conv2d(3, 8, 3)
>>> with torch.no_grad():
...     bad.weight[0, 0, 0, 0] = float("nan")
>>> non_finite(bad)
['weight (1 NaN of 216 values)']
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.parameter import UninitializedTensorMixin

from .errors import AlreadyPreparedError, CaptureError, InvalidModelError, NonFiniteError
from .ir import attributes_read, fetch_attr, is_batch_norm
from .quant.fake_quant import fake_quantizers

def unwrap_parallel(model: nn.Module, entry: str) -> nn.Module:
    """The module inside ``nn.DataParallel`` / ``DistributedDataParallel`` (with a warning), else ``model``.

    Tracing the wrapper would trace its scatter/gather code, not the model, and fail far from the
    cause. The result of ``entry`` is then a plain module named like the inner one (no ``module.``
    prefix): wrap it again for data-parallel training.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     inner = unwrap_parallel(nn.DataParallel(nn.Conv2d(3, 8, 3)), "prepare")
    >>> type(inner).__name__, str(caught[0].message)[:68]
    ('Conv2d', 'prepare(): the model is wrapped in DataParallel; working on its .mod')
    """
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if not isinstance(model, wrappers):
        return model
    kind = type(model).__name__
    warnings.warn(f"{entry}(): the model is wrapped in {kind}; working on its .module ({type(model.module).__name__})"
                  f". The result is not wrapped and its parameter names have no 'module.' prefix: wrap it in "
                  f"{kind} again to train it in parallel", UserWarning, stacklevel=3)
    return unwrap_parallel(model.module, entry)


def check_model(model: nn.Module, entry: str) -> None:
    """Refuse models ``entry`` ("explain", "merge", "prepare") cannot work on."""
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"{entry}() takes an nn.Module; got {type(model).__name__}")
    name = type(model).__name__
    if fake_quantizers(model):
        todo = {"prepare": "prepare the original float model instead",
                "merge": "merge the original float model, or use repq_fx.lower(qmodel) for the deploy model "
                         "of a prepared one",
                "explain": "explain the original float model"}[entry]
        raise AlreadyPreparedError(f"{name} is already prepared (it contains repq_fx fake quantizers).\n"
                                   f"What to do: {todo}.")
    ao = _torch_ao_quant_modules(model)
    if ao:
        raise AlreadyPreparedError(
            f"{name} contains torch.ao.quantization fake quantizers/observers ({', '.join(ao[:3])}"
            f"{', ...' if len(ao) > 3 else ''}): it is already prepared for another quantization flow.\n"
            f"What to do: pass the float model (before torch.ao.quantization.prepare_qat / prepare) to {entry}().")
    stale = [n or "<root>" for n, m in model.named_modules() for h in m._forward_pre_hooks.values()
             if type(h).__name__ == "WeightNorm" and isinstance(getattr(m, h.name, None), torch.Tensor)
             and getattr(m, h.name).grad_fn is not None]
    if stale:
        raise CaptureError(
            f"{name} uses torch.nn.utils.weight_norm (deprecated) on {', '.join(stale[:3])}: its weight is a "
            "computed tensor that cannot be deep-copied (repq_fx works on a copy and never modifies the model).\n"
            "What to do: use torch.nn.utils.parametrizations.weight_norm, or torch.nn.utils.remove_weight_norm "
            "first (or run one forward pass under torch.no_grad(), which leaves a copyable weight).")
    lazy = [n for n, t in _named_tensors(model) if isinstance(t, UninitializedTensorMixin)]
    if lazy:
        raise InvalidModelError(
            f"{name} has uninitialized (lazy) parameters: {', '.join(lazy[:5])}{', ...' if len(lazy) > 5 else ''}.\n"
            "What to do: run one forward pass on a batch of the right shape first; lazy modules then "
            "become ordinary ones.")


def _torch_ao_quant_modules(model: nn.Module) -> list[str]:
    try:
        from torch.ao.quantization import FakeQuantizeBase
        from torch.ao.quantization.observer import ObserverBase
    except Exception:  # pragma: no cover - torch without ao
        return []
    return [n or "<root>" for n, m in model.named_modules() if isinstance(m, (FakeQuantizeBase, ObserverBase))]


def _named_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=True)
    yield from model.named_buffers(remove_duplicate=True)


def non_finite(model: nn.Module, extra: Iterable[tuple[str, torch.Tensor]] = ()) -> list[str]:
    """``"name (k NaN of n values)"`` for every parameter, BN statistic and ``extra`` tensor that is not
    finite, and every negative BN running variance.

    Buffers other than BN statistics are not checked unless passed in ``extra`` (a model may keep
    ``-inf`` masks on purpose); parameters always are.

    >>> layer = nn.Linear(2, 1)
    >>> _ = layer.bias.data.fill_(float("nan"))
    >>> non_finite(layer)
    ['bias (1 NaN of 1 values)']
    """
    found: dict[str, str] = {}
    tensors = list(model.named_parameters(remove_duplicate=True))
    for mod_name, m in model.named_modules():
        if is_batch_norm(m):
            for key in ("running_mean", "running_var"):
                t = getattr(m, key, None)
                if isinstance(t, torch.Tensor):
                    tensors.append((f"{mod_name}.{key}" if mod_name else key, t))
    tensors += list(extra)
    for name, t in tensors:
        if name in found or not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.is_meta:
            continue
        t = t.detach()
        if not t.numel():
            continue
        lo, hi = torch.aminmax(t)  # one pass; NaN anywhere makes both NaN, an Inf shows at an end
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            if name.endswith("running_var") and bool(lo < 0):
                found[name] = f"{name} ({int((t < 0).sum())} negative of {t.numel()} values)"
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        what = " and ".join(f"{k} {kind}" for k, kind in ((nan, "NaN"), (inf, "Inf")) if k)
        found[name] = f"{name} ({what} of {t.numel()} values)"
    return list(found.values())


def block_tensors(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> list[tuple[str, torch.Tensor]]:
    """The tensors (parameters and buffers, by qualified name) that the merged weights of ``nodes`` read."""
    out: list[tuple[str, torch.Tensor]] = []
    for attr in attributes_read(nodes):
        obj = fetch_attr(gm, attr.target)
        if isinstance(obj, torch.Tensor):
            out.append((attr.target, obj))
        elif isinstance(obj, nn.Module):
            out += [(f"{attr.target}.{n}", t) for n, t in _named_tensors(obj)]
    return out


def check_finite(model: nn.Module, entry: str, extra: Iterable[tuple[str, torch.Tensor]] = ()) -> None:
    """Raise :class:`NonFiniteError` naming every non-finite (or invalid) parameter and BN statistic."""
    bad = non_finite(model, extra)
    if bad:
        shown = "; ".join(bad[:8]) + ("; ..." if len(bad) > 8 else "")
        raise NonFiniteError(
            f"{type(model).__name__} has non-finite or invalid values: {shown}. {entry}() would fold them into the merged "
            "convs (every output of those blocks would be NaN/Inf).\nWhat to do: fix or re-initialise them "
            "(a diverged training run? a broken checkpoint?), e.g. check torch.isfinite on model.state_dict().")


def _analysis_nodes(analysis) -> list[fx.Node]:
    return [n for b in analysis.blocks for n in b.region.nodes]


def check_graph(gm: fx.GraphModule, analysis, entry: str) -> None:
    """The checks that need the captured graph and its blocks (``analysis`` from ``find_blocks``)."""
    nodes = _analysis_nodes(analysis)
    check_finite(gm, entry, block_tensors(gm, nodes))


def graph_warnings(gm: fx.GraphModule, analysis) -> list[str]:
    """What ``check_graph`` would refuse, as lines for ``explain`` (which describes the model anyway)."""
    bad = non_finite(gm, block_tensors(gm, _analysis_nodes(analysis)))
    return [f"non-finite value: {b}; merge/prepare refuse this model" for b in bad]


__all__ = ["unwrap_parallel", "check_model", "check_graph", "graph_warnings", "check_finite", "non_finite", "block_tensors"]
