"""The canonical op set as code: what every stage after capture sees, and the tools to read and rewrite it.

After capture (:mod:`repq_fx.capture`) a graph holds each op in one form:

==========================  ==========================================================  ==================
op                          canonical node                                              view
==========================  ==========================================================  ==================
conv                        ``F.conv2d(x, w, b, stride, padding, dilation, groups)``    :class:`ConvView`
BatchNorm (any form)        ``batch_norm(x, <get_attr of the BN module>)``              :class:`BatchNormView`
avg-pool                    ``F.avg_pool2d(x, k, s, p, ceil_mode, count_include_pad,    :class:`AvgPoolView`
                            div)``
pad                         ``F.pad(x, pads, "constant", value)``                       :class:`PadView`
crop                        ``x[:, :, a:-b, c:-d]`` (``operator.getitem``)              :class:`CropView`
add / sub / mul / div, neg  ``operator.add`` / ``sub`` / ``mul`` / ``truediv``, ``neg``  :class:`ArithView`
cat                         ``torch.cat(tensors, dim)``                                 :class:`CatView`
==========================  ==========================================================  ==================

- :mod:`.views`: one typed view per op, binding a node's arguments by name (``ConvView.of(node).groups``);
- :mod:`.records`: one record per op, with the label ``explain`` shows, its channel rule and its
  refusal text (:func:`record_of`);
- :mod:`.rules`: the one rule-table engine every registry uses (:class:`RuleTable`, :data:`KEEP`,
  :data:`ERASED`);
- :mod:`.graph`: GraphModule helpers (attribute lookup, free names, sizes, the pass epilogue);
- :mod:`.norm`: the canonical BatchNorm op itself.

>>> import torch.nn as nn
>>> from repq_fx.capture import capture
>>> gm = capture(nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.BatchNorm2d(8)))
>>> conv = next(n for n in gm.graph.nodes if n.op == "call_function")
>>> ConvView.of(conv).stride, record_of(conv).label(gm, conv)
((1, 1), 'conv3x3')
"""
from __future__ import annotations

from .graph import (attributes_read, fetch_attr, finish_pass, free_module_path, hook_kinds, input_dependent,
                    insert_call, is_size_value, param_dtype, size_function)
from .norm import batch_norm, is_batch_norm
from .records import OpRecord, conv_module_refusal, module_refusal, record_of, register_record
from .rules import ERASED, KEEP, RuleTable, apply
from .views import (ArithView, AvgPoolView, BatchNormView, CatView, ConvView, CropView, PadView, View, bind_schema,
                    conv_padding)

__all__ = ["attributes_read", "fetch_attr", "finish_pass", "free_module_path", "hook_kinds", "input_dependent",
           "insert_call", "is_size_value", "param_dtype", "size_function", "batch_norm", "is_batch_norm", "OpRecord",
           "conv_module_refusal", "module_refusal", "record_of", "register_record", "ERASED", "KEEP", "RuleTable",
           "apply", "ArithView", "AvgPoolView", "BatchNormView", "CatView", "ConvView", "CropView", "PadView", "View",
           "bind_schema", "conv_padding"]
