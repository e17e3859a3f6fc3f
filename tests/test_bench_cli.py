"""``repq-fx bench`` (``repq_fx.app.cli``), its timing core (``repq_fx.app.bench``) and ``--capture``.

No assertion here is about speed: the timings only have to be there, positive and consistent.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

from repq_fx.app import cli
from repq_fx.app.bench import TrainStep, round_robin, rotation, summarize

# a row of the timing table: name, median, IQR low-high, ratio to float
ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<median>\d+\.\d+)\s+(?P<q1>\d+\.\d+)-(?P<q3>\d+\.\d+)\s+(?P<ratio>\d+\.\d+)x$")


def _rows(text: str) -> dict[str, dict[str, float]]:
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            rows[m["name"]] = {k: float(m[k]) for k in ("median", "q1", "q3", "ratio")}
    return rows


def _check_table(rows: dict[str, dict[str, float]], names: list[str]) -> None:
    assert list(rows) == names
    for name, r in rows.items():
        assert 0 < r["q1"] <= r["median"] <= r["q3"], (name, r)
        assert r["ratio"] > 0
    assert rows[names[0]]["ratio"] == 1.0


# ---------------------------------------------------------------- the timing core


def test_round_robin_rotates_the_order_and_times_every_run() -> None:
    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    ticks = itertools.count()
    rounds_seen: list[int] = []
    times = round_robin(runners, rounds=3, warmup=2, repeat=2, clock=lambda: next(ticks),
                        on_round=lambda r, t: rounds_seen.append(r))
    assert calls[:6] == list("aabbcc")  # warm-up: each runner in turn
    timed = calls[6:]
    assert timed == list("aabbcc") + list("bbccaa") + list("ccaabb")
    assert rounds_seen == [0, 1, 2]
    assert {name: t for name, t in times.items()} == {name: [1] * 6 for name in "abc"}  # one tick per run


def test_rotation_gives_every_runner_every_place() -> None:
    orders = [rotation(["a", "b", "c"], r) for r in range(3)]
    for place in range(3):
        assert sorted(order[place] for order in orders) == ["a", "b", "c"]


def test_summarize_medians_and_quartiles() -> None:
    s = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.median, s.minimum, s.count) == (3.0, 1.0, 5)
    few = summarize([1.0, 3.0], method="inclusive")
    assert 1.0 <= few.q1 <= few.median <= few.q3 <= 3.0
    assert summarize([2.0]).q1 == summarize([2.0]).q3 == 2.0
    assert summarize([4.0, 4.0]).ratio(summarize([2.0, 2.0])) == 2.0
    with pytest.raises(ValueError):
        summarize([])


def test_train_step_updates_the_module() -> None:
    module = torch.nn.Linear(4, 3)
    before = module.weight.detach().clone()
    step = TrainStep(module, torch.randn(8, 4), torch.randint(0, 3, (8,)), lr=0.1)
    step()
    assert step.module is module and not torch.equal(module.weight, before)


# ---------------------------------------------------------------- repq-fx bench


def test_bench_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("--what", "--rounds", "--warmup", "--capture", "median", "rotates", "repq-fx bench timm:", "--compile"):
        assert word in out


def test_bench_step_prints_the_three_variants(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "examples:RepVGGNet", "--input-size", "1x28x28", "--batch", "4", "--rounds", "2",
                     "--warmup", "1", "--what", "step"]) == 0
    out = capsys.readouterr().out
    assert "QAT training step, batch 4" in out and "median of 2 rounds" in out
    assert "ONNX Runtime" not in out
    _check_table(_rows(out), ["float", "repq-bn", "repq-bnest"])
    assert "compiling" not in out


@pytest.mark.needs_cxx
def test_bench_step_compiled_twins(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "examples:RepVGGNet", "--input-size", "1x28x28", "--batch", "4", "--rounds", "2",
                     "--warmup", "1", "--what", "step", "--compile", "--no-progress"]) == 0
    out = capsys.readouterr().out
    names = ["float", "repq-bn", "repq-bnest"]
    _check_table(_rows(out), names + [f"{n} (compiled)" for n in names])
    compiled = re.search(r"compiling \(the first step, untimed\): (.*)$", out, re.M)
    assert compiled, out
    seconds = re.findall(r"(\S+) \(compiled\) (\d+\.\d) s", compiled[1])
    assert [n for n, _ in seconds] == names and all(float(s) > 0 for _, s in seconds)


def test_bench_latency_float_vs_int8(small_repvgg: None, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    assert cli.main(["bench", "repq_fx.testing.blocks:RepVGGNet", "--input-size", "1x28x28", "--rounds", "2",
                     "--warmup", "1", "--what", "latency", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "ONNX Runtime latency, batch 1" in out and "QAT training step" not in out
    _check_table(_rows(out), ["float (merged)", "int8 QDQ"])
    assert "6 QLinearConv" in out and "0 float Conv" in out


def test_bench_latency_of_a_checkpoint(small_repvgg: None, fake_fmnist: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    from repq_fx.app.train import TrainConfig, run_training

    ckpt = fake_fmnist / "q.pt"
    run_training(TrainConfig(model="repq_fx.testing.blocks:RepVGGNet", method="repq-bn", bits=(4, 4), epochs=1,
                             batch_size=64, calib_batches=1, subset=128), ckpt, progress=False, log=lambda _: None)
    assert cli.main(["bench", "repq_fx.testing.blocks:RepVGGNet", "--ckpt", str(ckpt), "--rounds", "1",
                     "--warmup", "0", "--what", "latency", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "input 1x28x28, W4A4" in out  # the checkpoint's data and bits
    _check_table(_rows(out), ["float (merged)", "int8 QDQ"])


@pytest.mark.parametrize("argv, says", [
    (["examples:NoSuchNet"], "accepted forms"),
    (["examples:RepVGGNet", "--input-size", "3x32x32", "--what", "step"], "--input-size"),
    (["examples:RepVGGNet", "--ckpt", "q.pt", "--what", "step"], "--what latency"),
])
def test_bench_bad_input_is_one_line(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--input-size", "28by28"], ["--rounds", "0"], ["--what", "speed"]])
def test_bench_bad_option_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "examples:RepVGGNet", *argv])
    assert exit_.value.code == 2


# ---------------------------------------------------------------- --capture


@pytest.mark.parametrize("capture, by_export", [("fx", False), ("export", True)])
def test_explain_capture(capture: str, by_export: bool, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain", "examples:RepVGGNet", "--input-size", "1x28x28", "--capture", capture]) == 0
    out = capsys.readouterr().out
    assert "RepVGGNet: 9 of 9 blocks merged" in out
    assert ("captured with torch.export" in out) is by_export


def test_merge_capture_fx(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["merge", "examples:RepVGGNet", "--input-size", "1x28x28", "--capture", "fx", "--check"]) == 0
    assert "convs 18 -> 9" in capsys.readouterr().out


def test_capture_choices_are_checked() -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["explain", "examples:RepVGGNet", "--capture", "dynamo"])
    assert exit_.value.code == 2
