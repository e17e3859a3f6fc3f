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
    nets = {"tiny": bench.NetSpec("repq_fx.testing.blocks:RepVGGNet", "fashion-mnist")}
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


def test_the_target_is_part_of_a_jobs_identity(tmp_path: Path) -> None:
    """A W8A8 cell trained for onnxruntime-u8u8 is not the onnxruntime one; a line written before targets
    existed counts as onnxruntime-vnni (the full-range grid it trained); torch.ao has no target."""
    import datetime

    bench = _load_bench()
    budget = bench.Budget(fp_epochs={"*": 5}, qat_epochs=1)
    common = {"net": "RepVGGNet", "bits": "W8A8", "seed": 0, "fp_epochs": 5, "qat_epochs": 1, "subset": None,
              "test_subset": None, "value": 91.0, "metric": "top1"}
    out = tmp_path / "results.jsonl"
    for extra in ({"method": "repq-bn"}, {"method": "repq-bn", "target": "onnxruntime-u8u8"},
                  {"method": "torchao"}):
        bench.append_result(out, {**common, **extra})

    def left(targets: list[str]) -> list[str]:
        jobs = bench.make_jobs(["RepVGGNet"], ["torchao", "repq-bn"], ["W8A8"], [0], [], targets=targets)
        logs: list[str] = []
        past = datetime.datetime.now() - datetime.timedelta(hours=1)  # count what is left, run nothing
        assert bench.run_benchmark(jobs, budget, out, stop_at=past, log=logs.append, ckpt_dir=tmp_path) == []
        return logs

    assert left(["onnxruntime-vnni", "onnxruntime-u8u8"])[0].startswith("3 of 3 jobs already in")
    assert left(["onnxruntime"])[0].startswith("1 of 2 jobs already in")  # torchao done, repq-bn not
    assert bench.Job("RepVGGNet", "repq-bn", "W8A8", 0).target == "onnxruntime"  # the default, as recorded
    assert bench.Job("RepVGGNet", "torchao", "W8A8", 0, "onnxruntime").target is None

    records = bench._select(bench.load_results(out), budget, ["RepVGGNet"])
    table = bench.markdown_table(records, ["RepVGGNet"], bench.METHODS, ["W8A8"])
    assert "| RepQ-BN [onnxruntime-u8u8] | " in table and "| RepQ-BN [onnxruntime-vnni] | " in table
