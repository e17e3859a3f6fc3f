"""Train and eval: where a model's forward takes a different path in train mode than ``model.eval()``.

A traced graph is one path through ``forward``: an ``if self.training:`` branch is decided at
capture time. BatchNorm and dropout are captured as modules that follow ``.train()``/``.eval()``
at run time; anything else that depends on ``self.training`` (torchvision GoogLeNet's auxiliary
heads, a hand-written stochastic depth) cannot follow the mode in one graph.

``prepare`` therefore compares the train-mode capture with the eval-mode one
(:func:`mode_difference`). Where they differ it keeps the eval-mode capture, the function
``merge``, ``lower`` and ``export_onnx`` deploy, and warns with
:class:`~repq_fx.errors.TrainingBranchWarning` naming where the train path differs
(:func:`warn_training_branch`). ``torch.ao``'s ``prepare_qat_fx`` traces the train path and keeps
it in eval mode too, so a GoogLeNet prepared there returns its auxiliary outputs after ``.eval()``;
here the prepared model's outputs are always those of ``model.eval()``.

>>> import torch.nn as nn
>>> from repq_fx.capture.tracer import trace
>>> class AuxHead(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.body, self.aux = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
...     def forward(self, x):
...         y = self.body(x)
...         return (y, self.aux(y)) if self.training else y
>>> model = AuxHead()
>>> mode_difference(trace(model, mode="train"), trace(model, mode="eval"))
'aux (call_module aux)'
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import TrainingBranchWarning

_MODE_FOLLOWING_IDENTITIES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                              nn.FeatureAlphaDropout)


def mode_difference(train_gm: fx.GraphModule, eval_gm: fx.GraphModule) -> str:
    """Where ``train_gm`` (captured in train mode) first computes something ``eval_gm`` does not ("" if nowhere).

    Nodes are matched in order; dropout modules are skipped in both graphs (they follow the mode).
    The answer names the first unmatched node: its module scope, op and target.
    """
    train_nodes = _without_dropout(train_gm)
    eval_nodes = _without_dropout(eval_gm)
    matched: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(train_nodes[0]):
        if i >= len(eval_nodes[0]) or not _same(node, eval_nodes[0][i], matched, train_nodes[1], eval_nodes[1]):
            return describe(node)
        matched[node] = eval_nodes[0][i]
    if len(eval_nodes[0]) > len(train_nodes[0]):
        return describe(eval_nodes[0][len(train_nodes[0])]) + " (eval mode only)"
    return ""


def _without_dropout(gm: fx.GraphModule) -> tuple[list[fx.Node], dict[fx.Node, fx.Node]]:
    """The nodes of ``gm`` but dropout modules, and each dropout node -> the node it passes on."""
    kept, through = [], {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _MODE_FOLLOWING_IDENTITIES):
            source = node.args[0]
            through[node] = through.get(source, source) if isinstance(source, fx.Node) else source
        else:
            kept.append(node)
    return kept, through


def _same(a: fx.Node, b: fx.Node, matched: dict[fx.Node, fx.Node], through_a: dict[fx.Node, fx.Node],
          through_b: dict[fx.Node, fx.Node]) -> bool:
    if a.op != b.op or not _equal_value(a.target, b.target):
        return False

    def same_arg(x: Any, y: Any) -> bool:
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
                return False
            x, y = through_a.get(x, x), through_b.get(y, y)
            return matched.get(x) is y
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return type(x) is type(y) and len(x) == len(y) and all(same_arg(p, q) for p, q in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same_arg(x[k], y[k]) for k in x)
        if isinstance(x, slice) and isinstance(y, slice):
            return same_arg((x.start, x.stop, x.step), (y.start, y.stop, y.step))
        return _equal_value(x, y)

    return same_arg(a.args, b.args) and same_arg(a.kwargs, b.kwargs)


def _equal_value(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and \
            x.dtype == y.dtype and bool(torch.equal(x, y))
    try:
        return type(x) is type(y) and bool(x == y)
    except Exception:  # an object without a usable ==
        return x is y


def describe(node: fx.Node) -> str:
    """``node`` for a message: the module it was traced in, its op and target."""
    stack = node.meta.get("nn_module_stack") or {}
    scopes = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    scope = scopes[-1] if scopes else ""
    if not scope and isinstance(node.target, str) and node.op in ("call_module", "get_attr"):
        scope = node.target if node.op == "call_module" else node.target.rpartition(".")[0]
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = f"{scope} " if scope else ""
    return f"{where}({node.op} {target})"


def warn_training_branch(name: str, difference: str, stacklevel: int = 5) -> None:
    """Warn that ``prepare`` captured ``name``'s eval-mode forward because its train path differs there."""
    warnings.warn(
        f"{name}.forward branches on self.training beyond BatchNorm and dropout: in train mode it differs from "
        f"model.eval() at {difference}. One graph cannot follow both paths, so prepare captured the eval-mode "
        "forward (what merge, lower and export_onnx deploy): the prepared model returns model.eval()'s outputs in "
        "both modes (BatchNorm and dropout modules still follow .train()/.eval()), and what only the train path "
        "computes (auxiliary heads, hand-written stochastic depth, F.dropout(x, p, self.training)) is not trained. "
        "What to do: if you need it, compute it outside the model or remove the branch on self.training.",
        TrainingBranchWarning, stacklevel=stacklevel)


__all__ = ["mode_difference", "describe", "warn_training_branch"]
