"""Moved to :mod:`repq_fx.ir.graph`; this name stays for the modules that still import it (passes/, api).

>>> from repq_fx.ir import graph
>>> fetch_attr is graph.fetch_attr
True
"""
from ..ir.graph import (attributes_read, fetch_attr, finish_pass, free_module_path, hook_kinds, insert_call,
                        is_size_value, param_dtype, size_function)

__all__ = ["attributes_read", "fetch_attr", "finish_pass", "free_module_path", "hook_kinds", "insert_call",
           "is_size_value", "param_dtype", "size_function"]
