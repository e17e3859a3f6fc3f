"""Test-wide settings and fixtures.

One torch thread per pytest-xdist worker, so ``pytest -n 2`` does not oversubscribe 2 cores.
``fake_fmnist`` writes a small synthetic Fashion-MNIST (class k: a bright bar at row 2k + 4, over
noise) as IDX files and points ``$REPQ_FASHION_MNIST`` at it; ``small_repvgg`` narrows
``RepVGGNet`` (widths 8/16/32, two blocks per stage) so training runs take seconds.
Tests marked ``needs_cxx`` (inductor compiles C++) are skipped where no C++ compiler is found.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_cxx: needs a C++ compiler (torch.compile with inductor on the CPU)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if shutil.which("g++") or shutil.which("c++"):
        return
    skip = pytest.mark.skip(reason="inductor needs a C++ compiler")
    for item in items:
        if "needs_cxx" in item.keywords:
            item.add_marker(skip)


def write_synthetic_fmnist(root: Path, n_train: int = 256, n_test: int = 100) -> None:
    """Four gzipped IDX files in ``root``: learnable, deterministic, tiny."""
    from repq_fx.app.data import fashion_mnist as fm

    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for k in range(10):
            images[labels == k, 2 * k + 4: 2 * k + 6, 4:24] = 255
        fm.write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images.to(torch.uint8))
        fm.write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.to(torch.uint8))


@pytest.fixture()
def fake_fmnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path``, with a synthetic Fashion-MNIST in ``tmp_path / "fmnist"`` that the readers find."""
    from repq_fx.app.data import fashion_mnist as fm

    root = tmp_path / "fmnist"
    root.mkdir()
    write_synthetic_fmnist(root)
    monkeypatch.setenv(fm.ENV_VAR, str(root))
    return tmp_path


@pytest.fixture()
def small_repvgg(monkeypatch: pytest.MonkeyPatch) -> None:
    """``repq_fx.testing.blocks.RepVGGNet`` with widths 8/16/32 and two blocks per stage."""
    import repq_fx.app.networks  # noqa: F401  first imported now, its NETWORKS would keep the small net for good
    from repq_fx.testing import blocks

    class Small(blocks.RepVGGNet):
        def __init__(self) -> None:
            super().__init__(widths=(8, 16, 32), blocks_per_stage=2)

    monkeypatch.setattr(blocks, "RepVGGNet", Small)
