"""Reference blocks and generated cases for tests and for users' own property tests.

Nothing in the library imports this package; it stands above the library (``tests/test_layering.py``).

- :mod:`repq_fx.testing.blocks`: re-parametrized training-time blocks written as their authors wrote
  them (RepVGG, QARepVGG, ACNet, DBB, OREPA, ECB, RepLK, UniRepLKNet) and a small RepVGG net. Each
  block carries its own ``reference_merge()``, computed from the papers' formulas independently of
  the merge pass: the oracle the pass is checked against.
- :mod:`repq_fx.testing.cases`: hostile and unusual small models, each with the outcome repq_fx must
  give (handled, kept as is, refused with a named error); ``python -m repq_fx.testing.cases`` prints
  the README's table of them.

>>> from repq_fx.testing.blocks import RepVGGBlock
>>> weight, bias = RepVGGBlock(4, 4).eval().reference_merge()
>>> tuple(weight.shape)
(4, 4, 3, 3)
"""
