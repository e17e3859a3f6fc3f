"""docs/adding-an-op.md's worked example, run as the page shows it: a learned per-channel scale branch
registered through the public API merges exactly (float64) and trains in the prepared model."""
from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import repq_fx

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-an-op.md"


@pytest.fixture(scope="module")
def example() -> types.ModuleType:
    """The page's code block, executed as a module of its own (torch.fx.wrap needs module level)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "the page has one code block to run"
    module = types.ModuleType("adding_an_op_example")
    exec(compile(blocks[0], str(DOC), "exec"), module.__dict__)
    return module


def _model(example: types.ModuleType) -> nn.Module:
    torch.manual_seed(0)
    model = example.ScaleBranch(4)
    with torch.no_grad():  # statistics and a scale away from their initial values
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model.double().eval()


def test_the_branch_is_named_by_its_label_and_merged(example: types.ModuleType) -> None:
    report = repq_fx.explain(_model(example), torch.randn(1, 4, 8, 8, dtype=torch.float64))
    assert [(b.branches, b.merged, b.kernels) for b in report.blocks] == [("[conv3x3 -> bn + chscale]", True,
                                                                           ((3, 3),))]


def test_merge_is_exact_against_the_modules_forward_in_float64(example: types.ModuleType) -> None:
    model = _model(example)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    merged = repq_fx.merge(model, x)
    assert [type(m).__name__ for m in merged.modules()].count("Conv2d") == 1
    assert not any(n.target is example.channel_scale for n in merged.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), rtol=0, atol=1e-12)


def test_the_scale_trains_inside_the_prepared_conv(example: types.ModuleType) -> None:
    model = _model(example).float().train()
    qmodel = repq_fx.prepare(model, example_inputs=(torch.randn(2, 4, 8, 8),))
    qmodel(torch.randn(2, 4, 8, 8)).square().sum().backward()
    grad = dict(qmodel.named_parameters())["scale"].grad
    assert grad is not None and bool(grad.abs().sum() > 0)
