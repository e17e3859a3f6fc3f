"""Test-wide settings: one torch thread per pytest-xdist worker, so `pytest -n 2` does not oversubscribe 2 cores."""
import torch

torch.set_num_threads(1)
