"""The application built on the library: the ``repq-fx`` command line, training, the demo, data and
model specs. It uses :mod:`repq_fx` as any user does; nothing in the library imports it
(``tests/test_layering.py``).

- :mod:`repq_fx.app.cli`: the ``repq-fx`` command (also ``python -m repq_fx``).
- :mod:`repq_fx.app.train`: QAT training, evaluation and checkpoints (``repq-fx train`` / ``eval``).
- :mod:`repq_fx.app.distributed`: one process group per ``torchrun`` run (DistributedDataParallel).
- :mod:`repq_fx.app.demo`: ``make demo``, Fashion-MNIST from float training to every runtime.
- :mod:`repq_fx.app.bench`: timing helpers (round-robin medians) of ``repq-fx bench`` and benchmarks/.
- :mod:`repq_fx.app.models`: model specs (``timm:NAME``, ``examples:NAME``, ...) and
  :mod:`repq_fx.app.networks`, the example networks ``examples:NAME`` builds.
- :mod:`repq_fx.app.data`: Fashion-MNIST, super-resolution photographs and the user's image folders.

>>> from repq_fx.app.models import resolve_model
>>> type(resolve_model("examples:RepVGGNet")).__name__
'RepVGGNet'
"""
