"""One record per op: its view, the label ``explain`` shows, its channel rule and its refusal text.

The canonical ops (table in :mod:`repq_fx.ir`) have records here; ``repq_fx.register_op`` adds one
for each op it registers a rule for. What the report and the block finder say about a node is
read from its record (:func:`record_of`), never from a chain of ``if`` on its target.

>>> import torch.nn as nn
>>> from repq_fx.capture import capture
>>> gm = capture(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8)))
>>> [record_of(n, gm).label(gm, n) for n in gm.graph.nodes if n.op == "call_function"]
['conv3x3/s2', 'bn']
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .graph import fetch_attr, hook_kinds
from .norm import batch_norm
from .rules import RuleTable
from .views import ArithView, AvgPoolView, BatchNormView, CatView, ConvView, CropView, PadView, View, conv_padding

Label = Callable[[fx.GraphModule, fx.Node], str]
ChannelRule = Callable[[fx.Node, Callable[[Any], Any]], "int | None"]
Refusal = Callable[[fx.GraphModule, fx.Node, str], str]


def _no_channels(node: fx.Node, param: Callable[[Any], Any]) -> int | None:
    return None


def _no_refusal(gm: fx.GraphModule, node: fx.Node, verdict: str) -> str:
    return ""


def _the_verdict(gm: fx.GraphModule, node: fx.Node, verdict: str) -> str:
    return verdict


@dataclass(frozen=True)
class OpRecord:
    """What the package knows about one op besides its linear map (the rules of ``patterns.linear_ops``).

    ``label(gm, node)``: the op in ``explain``'s branch expressions. ``in_channels(node, param)``: the
    input channels the op's parameters fix (``param`` gives a parameter argument's value), None if
    they fix none. ``refusal(gm, node, verdict)``: why the node stays out of every block when the
    linear-op rules refuse it (``verdict``: their reason), "" to say nothing. ``conv``: a convolution
    (the report names it by its weight's module).
    """

    name: str
    targets: tuple[Any, ...]
    label: Label
    view: type[View] | None = None
    in_channels: ChannelRule = _no_channels
    refusal: Refusal = _no_refusal
    conv: bool = False


RECORDS: RuleTable[OpRecord] = RuleTable("op record")


def register_record(record: OpRecord) -> OpRecord:
    """Make ``record`` the record of each of its targets."""
    RECORDS.register(*record.targets)(record)
    return record


def label_function(target: Any, label: str | Label) -> OpRecord:
    """Name the op ``target`` ``label`` in ``explain`` (a string, or a function of the graph module and the node),
    keeping what an existing record of it says besides (its view, channel rule, refusal)."""
    as_label = label if callable(label) else named(label)
    existing = RECORDS.for_function(target)
    if existing is not None:
        return register_record(replace(existing, targets=(target,), label=as_label))
    return register_record(OpRecord(getattr(target, "__name__", str(target)), (target,), as_label))


def record_of(node: fx.Node, root: nn.Module | None = None) -> OpRecord | None:
    """The record of what ``node`` calls (None for an op the package has no record of)."""
    return RECORDS.lookup(node, root)


def named(name: str) -> Label:
    """A label that is always ``name``."""
    return lambda gm, node: name


def target_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """The label of an op registered without one: its function's name."""
    return getattr(node.target, "__name__", str(node.target))


# -- labels ---------------------------------------------------------------------------------------------

def _conv_label(gm: fx.GraphModule, node: fx.Node) -> str:
    # conv3x3/s2/d2/g4; "linear" for a linear on channels-last pixels written as a 1x1 conv (capture.canonicalize)
    if "repq_linear" in node.meta:
        return "linear"
    v = ConvView.of(node)
    w = v.weight
    shape = tuple(fetch_attr(gm, w.target).shape) if isinstance(w, fx.Node) and w.op == "get_attr" else None
    name = f"conv{shape[2]}x{shape[3]}" if shape else "conv"
    for letter, value in (("s", v.stride), ("d", v.dilation)):
        if _gt1(value):
            name += f"/{letter}{_fmt(value)}"
    if v.groups != 1:
        name += f"/g{v.groups}"
    return name + ("(computed)" if isinstance(w, fx.Node) and w.op != "get_attr" else "")


def _pad_label(gm: fx.GraphModule, node: fx.Node) -> str:
    value = PadView.of(node).value
    return "pad" if value == 0 else f"pad({value:g})"


def _gt1(v: Any) -> bool:
    return any(x != 1 for x in v) if isinstance(v, (tuple, list)) else v != 1


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return str(v[0]) if len(set(v)) == 1 else "x".join(str(x) for x in v)
    return str(v)


# -- module refusals --------------------------------------------------------------------------------------

def module_refusal(module: nn.Module) -> str:
    """Why any module must stay an opaque ``call_module`` ("" if it may be rewritten).

    A rewrite replaces the module call by functional ops on its parameters, which would drop its
    hooks (the deprecated ``weight_norm`` is one) and read a parametrized weight outside
    ``torch.nn.utils.parametrize`` (``spectral_norm`` runs a power iteration on every read in train mode).

    >>> module_refusal(nn.Conv2d(1, 1, 1))
    ''
    """
    kinds = hook_kinds(module)
    if kinds:
        return (f"{type(module).__name__} has hooks ({', '.join(kinds)}); merging would drop them, so it is "
                "left as it is (remove the hooks to merge it)")
    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        return (f"{type(module).__name__} is parametrized ({names}: torch.nn.utils.parametrize, e.g. weight_norm, "
                "spectral_norm); left as it is (torch.nn.utils.parametrize.remove_parametrizations(module, "
                "name) first merges it)")
    return ""


def conv_module_refusal(conv: nn.Module) -> str:
    """Why a conv module stays opaque ("" if it becomes a canonical conv).

    >>> conv_module_refusal(nn.Conv2d(1, 1, 2, padding="same"))
    "padding='same' with an even kernel pads asymmetrically; left as it is"
    """
    refusal = module_refusal(conv)
    if refusal:
        return refusal
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return f"{type(conv).__name__}: a transposed convolution is not merged (only Conv2d); left as it is"
    if isinstance(conv, nn.modules.conv._ConvNd) and not isinstance(conv, nn.Conv2d):
        return (f"{type(conv).__name__}: only 2-d convolutions are merged and quantized; left as it is, in float")
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} overrides Conv2d.forward; register a rule or make it traceable"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: only zero padding can be merged (a conv cannot fold its borders)"
    if conv_padding(conv.padding, conv.weight.shape, conv.dilation) is None:
        return "padding='same' with an even kernel pads asymmetrically; left as it is"
    return ""


def _fixed_text(text: str) -> Refusal:
    return lambda gm, node, verdict: f"{node.target.__name__}: {text}"


# -- the records --------------------------------------------------------------------------------------------

CONV = register_record(OpRecord(
    "conv", (F.conv2d, torch.conv2d), _conv_label, ConvView, conv=True, refusal=_the_verdict,
    in_channels=lambda node, param: int(param(ConvView.of(node).weight).shape[1]) * int(ConvView.of(node).groups)))
BATCH_NORM = register_record(OpRecord(
    "bn", (batch_norm,), named("bn"), BatchNormView,
    in_channels=lambda node, param: int(param(BatchNormView.of(node).module).num_features)))
AVG_POOL = register_record(OpRecord(
    "avg_pool", (F.avg_pool2d,), lambda gm, node: f"avgpool{_fmt(AvgPoolView.of(node).kernel_size)}", AvgPoolView))
PAD = register_record(OpRecord("pad", (F.pad,), _pad_label, PadView, refusal=_the_verdict))
CROP = register_record(OpRecord("crop", (operator.getitem,), named("crop"), CropView))
SCALE = register_record(OpRecord("scale", (operator.mul, operator.truediv, operator.neg, torch.neg), named("scale"),
                                 ArithView))
SHIFT = register_record(OpRecord("shift", (operator.add, operator.sub), named("shift"), ArithView))
CAT = register_record(OpRecord("cat", (torch.cat,), named("cat"), CatView))
# convolutions that are not canonical: named in the report, kept out of blocks with these reasons
CONV_ND = register_record(OpRecord(
    "conv_nd", (F.conv1d, F.conv3d), target_name, ConvView, conv=True,
    refusal=_fixed_text("only 2-d convolutions are merged and quantized; left as it is, in float")))
CONV_TRANSPOSE = register_record(OpRecord(
    "conv_transpose", (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), target_name, conv=True,
    refusal=_fixed_text("a transposed convolution is not merged (only conv2d); left as it is")))
CONV_MODULE = register_record(OpRecord(
    "conv module", (nn.modules.conv._ConvNd,), target_name,
    refusal=lambda gm, node, verdict: conv_module_refusal(gm.get_submodule(node.target)) or verdict))
BATCH_NORM_MODULE = register_record(OpRecord(
    "bn module", (nn.modules.batchnorm._BatchNorm,), named("bn"),
    refusal=lambda gm, node, verdict: module_refusal(gm.get_submodule(node.target)) or verdict))

__all__ = ["OpRecord", "RECORDS", "register_record", "record_of", "named", "target_name", "module_refusal",
           "conv_module_refusal", "CONV", "BATCH_NORM", "AVG_POOL", "PAD", "CROP", "SCALE", "SHIFT", "CAT"]
