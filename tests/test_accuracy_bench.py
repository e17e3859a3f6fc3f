"""benchmarks/accuracy.py must not rot: its core runs end to end on a few hundred synthetic images.

The synthetic Fashion-MNIST and the small RepVGG (widths 8/16/32) are conftest's ``fake_fmnist``
and ``small_repvgg`` fixtures (IDX files found through ``$REPQ_FASHION_MNIST``). This checks plumbing
(float checkpoint, RepQ QAT, torch.ao per-branch QAT, the results file, resume, table, plot),
not accuracy.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_core_runs_resumes_and_reports(fake_fmnist: Path, small_repvgg: None) -> None:
    bench = _load_bench()
    nets = {"tiny": bench.NetSpec("repq_fx.examples.blocks:RepVGGNet", "fashion-mnist")}
    jobs = bench.make_jobs(["tiny"], ["fp", "repq-bn", "torchao"], ["W4A4"], [0], [], registry=nets)
    assert [(j.method, j.bits) for j in jobs] == [("fp", "FP"), ("repq-bn", "W4A4"), ("torchao", "W4A4")]
    budget = bench.Budget(fp_epochs={"*": 1}, qat_epochs=1)
    out = fake_fmnist / "results.jsonl"
    logs: list[str] = []
    new = bench.run_benchmark(jobs, budget, out, nets=nets, ckpt_dir=fake_fmnist / "ckpt", log=logs.append)
    assert [r.get("error") for r in new] == [None, None, None], logs
    for rec in new:
        assert 0.0 <= rec["value"] <= 100.0 and rec["metric"] == "top1"
    by_method = {r["method"]: r for r in new}
    assert by_method["repq-bn"]["convs_per_block"] == 1
    # torch.ao quantizes each branch: 2 fake-quantized convs per RepVGG block, not one deployable conv
    assert set(by_method["torchao"]["convs_per_block"].values()) == {2}
    assert by_method["torchao"]["deployable"].startswith("no")
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == 3

    again = bench.run_benchmark(jobs, budget, out, nets=nets, ckpt_dir=fake_fmnist / "ckpt", log=logs.append)
    assert again == []  # resumable: every (net, method, bits, seed) is already there

    records = bench._select(bench.load_results(out), budget, ["tiny"])
    table = bench.markdown_table(records, ["tiny"], bench.METHODS, ["W4A4"])
    assert "| RepQ-BN | yes |" in table and "torch.ao QAT per branch" in table
    png = bench.plot(records, ["tiny"], bench.METHODS, ["W4A4"], fake_fmnist / "acc.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
