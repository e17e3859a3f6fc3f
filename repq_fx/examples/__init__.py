"""Example models written the way users write them (no repq_fx code inside).

:mod:`repq_fx.examples.blocks` holds re-parametrized training-time blocks
(RepVGG, QARepVGG, ACNet, DBB, OREPA, ECB, RepLK, UniRepLKNet) and a small
RepVGG net. Each block carries its own ``reference_merge()``, which is the
self-consistency oracle for the merge pass.
"""
