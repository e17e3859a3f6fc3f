"""Example models written the way users write them (no repq_fx code inside).

:mod:`repq_fx.examples.blocks` holds re-parametrized training-time blocks
(RepVGG, QARepVGG, ACNet, DBB, OREPA, ECB, RepLK, UniRepLKNet) and a small
RepVGG net. Each block carries its own ``reference_merge()``, which is the
self-consistency oracle for the merge pass.

:mod:`repq_fx.examples.networks` builds whole networks from those blocks for the
benchmarks and the ``train`` command: the small RepVGG and QARepVGG nets, AC-, DBB-
and OREPA-ResNet-18 for 28x28 grey images, and ECBSR M4C16 x2
(``repq_fx.examples.networks.NETWORKS``; ``examples:NAME`` on the command line).
"""
