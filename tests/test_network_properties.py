"""Whole-network property tests: random stacks of random blocks, end to end.

hypothesis stacks 1-3 random blocks (the mergeable and the non-mergeable families of
test_merge_properties.py, joined by 1x1 adapters where widths differ) with activations,
pooling and a head. For every network:

- ``merge`` equals the network in eval mode (float64, relative error <= 1e-9);
- ``prepare`` -> ``calibrate`` -> one SGD step -> ``lower`` -> ``export_onnx`` -> ONNX Runtime
  runs end to end in float32, or a step raises a ``RepQError`` (never another exception); when
  it runs, every layer of the ONNX Runtime file agrees with the lowered model on the lowered
  model's own inputs (within one step on >= 99.9 % of its outputs: ``segment_parity``, the same
  verdict on any x86 CPU), and the lowered model has one integer conv per quantized block.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import repq_fx
from repq_fx.export.parity import onnx_runtime_parity, segment_parity
from repq_fx.quant.fake_quant import WeightFakeQuant
from repq_fx.quant.lowered import QuantizedConv2d, QuantizedLinear
from test_merge_properties import HazardBlock, RandomBlock, _randomize, hazard_specs, mergeable_specs

pytest.importorskip("onnxruntime")

REL_TOL = 1e-9
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    blocks: tuple  # BlockSpec | HazardSpec
    after: tuple[str, ...]  # what follows each block: "relu" | "gelu" | "maxpool" | "none"
    head: str  # "linear" (global pool + linear) | "conv" (1x1 conv) | "none"
    size: int
    seed: int


def _io(spec) -> tuple[int, int]:
    return spec.cin, spec.cout


class RandomNetwork(nn.Module):
    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = _io(spec.blocks[0])[0]
        self.in_channels = width
        for block, after in zip(spec.blocks, spec.after):
            cin, cout = _io(block)
            if cin != width:
                layers.append(nn.Conv2d(width, cin, 1))
            layers.append(RandomBlock(block) if hasattr(block, "branches") else HazardBlock(block))
            layers.append({"relu": nn.ReLU(), "gelu": nn.GELU(), "maxpool": nn.MaxPool2d(2, ceil_mode=True),
                           "none": nn.Identity()}[after])
            width = cout
        self.body = nn.Sequential(*layers)
        if spec.head == "linear":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))
        elif spec.head == "conv":
            self.head = nn.Conv2d(width, 3, 1)
        else:
            self.head = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@st.composite
def network_specs(draw) -> NetworkSpec:
    n = draw(st.integers(1, 3))
    blocks = tuple(draw(st.one_of(mergeable_specs(), mergeable_specs(), hazard_specs())) for _ in range(n))
    after = tuple(draw(st.sampled_from(["relu", "relu", "gelu", "maxpool", "none"])) for _ in range(n))
    return NetworkSpec(blocks, after, draw(st.sampled_from(["linear", "conv", "none"])),
                       draw(st.integers(12, 20)), draw(st.integers(0, 2**31 - 1)))


def _input(spec: NetworkSpec, channels: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.seed + seed)
    return torch.randn(4, channels, spec.size, spec.size, generator=g, dtype=torch.float64).to(dtype)


def _build(spec: NetworkSpec) -> RandomNetwork:
    return _randomize(RandomNetwork(spec), spec.seed)


@SETTINGS
@given(spec=network_specs())
def test_merge_of_a_random_network_is_exact(spec: NetworkSpec) -> None:
    net = _build(spec)
    x = _input(spec, net.in_channels, torch.float64)
    with torch.no_grad():
        expected = net(x)
        actual = repq_fx.merge(net)(x)
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
    assert err <= REL_TOL


@SETTINGS
@given(spec=network_specs())
def test_random_network_quantizes_and_deploys_or_refuses_clearly(spec: NetworkSpec, tmp_path_factory) -> None:
    net = _build(spec).float()
    x = _input(spec, net.in_channels, torch.float32)
    stage = "prepare"
    try:
        qmodel = repq_fx.prepare(net)
        stage = "calibrate"
        repq_fx.calibrate(qmodel, [_input(spec, net.in_channels, torch.float32, seed=s) for s in (1, 2)])
        stage = "train step"
        qmodel.train()
        opt = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
        out = qmodel(x)
        out.square().mean().backward()
        opt.step()
        stage = "lower"
        lowered = repq_fx.lower(qmodel)
        stage = "export_onnx"
        path = str(tmp_path_factory.mktemp("onnx") / "net.onnx")
        repq_fx.export_onnx(lowered, (x[:1],), path)
    except repq_fx.RepQError as e:
        assert str(e), f"{stage}: a RepQError without a message"
        return
    except Exception as e:  # noqa: BLE001 - the property: nothing but RepQError escapes
        raise AssertionError(f"{stage} raised {type(e).__name__} (not a RepQError): {e}") from e
    blocks = sum(isinstance(m, WeightFakeQuant) for m in qmodel.modules())
    layers = sum(isinstance(m, (QuantizedConv2d, QuantizedLinear)) for m in lowered.modules())
    assert layers == blocks
    with torch.no_grad():
        expected = lowered(x).numpy()
    parity = onnx_runtime_parity(path, lowered, (x,))  # end to end: shapes and what ORT runs
    assert parity.values == expected.size
    assert parity.ops["QLinearConv"] == sum(isinstance(m, QuantizedConv2d) for m in lowered.modules())
    # layer by layer on the lowered model's own values: the same verdict on every x86 CPU
    bad = [str(s) for s in segment_parity(path, lowered, (x,)) if not s.ok]
    assert not bad, f"ONNX Runtime vs lowered: {bad}"
