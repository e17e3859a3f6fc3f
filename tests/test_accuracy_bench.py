"""benchmarks/accuracy.py must not rot: its core runs end to end on a few hundred synthetic images.

The synthetic Fashion-MNIST is the one of ``test_train_cli.py`` (IDX files found through
``$REPQ_FASHION_MNIST``); the net is a small RepVGG (widths 8/16/32). This checks plumbing
(float checkpoint, RepQ QAT, torch.ao per-branch QAT, the results file, resume, table, plot),
not accuracy.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from repq_fx.data import fashion_mnist as fm

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_bench"] = module
    spec.loader.exec_module(module)
    return module


def _synthetic(root: Path, n_train: int = 320, n_test: int = 100) -> None:
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for k in range(10):
            images[labels == k, 2 * k + 4: 2 * k + 6, 4:24] = 255
        fm.write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images.to(torch.uint8))
        fm.write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.to(torch.uint8))


@pytest.fixture()
def small_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from repq_fx.examples import blocks

    class Small(blocks.RepVGGNet):
        def __init__(self) -> None:
            super().__init__(widths=(8, 16, 32), blocks_per_stage=2)

    monkeypatch.setattr(blocks, "RepVGGNet", Small)
    root = tmp_path / "fmnist"
    root.mkdir()
    _synthetic(root)
    monkeypatch.setenv(fm.ENV_VAR, str(root))
    return tmp_path


def test_core_runs_resumes_and_reports(small_setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_bench()
    nets = {"tiny": bench.NetSpec("repq_fx.examples.blocks:RepVGGNet", "fashion-mnist")}
    jobs = bench.make_jobs(["tiny"], ["fp", "repq-bn", "torchao"], ["W4A4"], [0], [], registry=nets)
    assert [(j.method, j.bits) for j in jobs] == [("fp", "FP"), ("repq-bn", "W4A4"), ("torchao", "W4A4")]
    budget = bench.Budget(fp_epochs={"*": 1}, qat_epochs=1)
    out = small_setup / "results.jsonl"
    logs: list[str] = []
    new = bench.run_benchmark(jobs, budget, out, nets=nets, ckpt_dir=small_setup / "ckpt", log=logs.append)
    assert [r.get("error") for r in new] == [None, None, None], logs
    for rec in new:
        assert 0.0 <= rec["value"] <= 100.0 and rec["metric"] == "top1"
    by_method = {r["method"]: r for r in new}
    assert by_method["repq-bn"]["convs_per_block"] == 1
    # torch.ao quantizes each branch: 2 fake-quantized convs per RepVGG block, not one deployable conv
    assert set(by_method["torchao"]["convs_per_block"].values()) == {2}
    assert by_method["torchao"]["deployable"].startswith("no")
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == 3

    again = bench.run_benchmark(jobs, budget, out, nets=nets, ckpt_dir=small_setup / "ckpt", log=logs.append)
    assert again == []  # resumable: every (net, method, bits, seed) is already there

    records = bench._select(bench.load_results(out), budget, ["tiny"])
    table = bench.markdown_table(records, ["tiny"], bench.METHODS, ["W4A4"])
    assert "| RepQ-BN | yes |" in table and "torch.ao QAT per branch" in table
    png = bench.plot(records, ["tiny"], bench.METHODS, ["W4A4"], small_setup / "acc.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
