"""``repq_fx.lower``: one integer conv per block, equal to the prepared model in eval mode.

The contract (docs/design.md): the lowered model holds the trained ``Q(M(theta))`` as int8
per-channel weights and an int32 bias at scale ``s_x * s_w``; its output equals
``qmodel.eval()`` up to the int32 bias rounding: identical argmax, and on the output grid within
one quantization step. Checked layer by layer on a chaotic random network (every layer fed the
prepared model's own input) and end to end on well-conditioned ones (see quantized_models.py).
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import repq_fx
from repq_fx.testing.blocks import ACBlock, ECB, OREPABlock, RepVGGBlock, RepVGGNet
from repq_fx.quant.fake_quant import WeightFakeQuant
from repq_fx.quant.lowered import QuantizeDequantize, QuantizedConv2d, QuantizedLinear
from quantized_models import calibrate_bn, output_step, prepared

timm = pytest.importorskip("timm")

SHAPE_64 = (8, 3, 64, 64)


class ConvCounter(TorchFunctionMode):
    """Counts the conv2d calls of a forward, from modules and functions alike."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.conv2d or func is torch.conv2d:
            self.count += 1
        return func(*args, **(kwargs or {}))


class BlockNet(nn.Module):
    """A user's small network of different re-parametrized blocks, with a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = RepVGGBlock(3, 16, stride=2)
        self.acb = ACBlock(16, 16)
        self.act = nn.ReLU()
        self.orepa = OREPABlock(16, 24, stride=2, expand_ratio=2)
        self.ecb = ECB(24, 24, act_type="relu", with_idt=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ecb(self.orepa(self.act(self.acb(self.stem(x))))))


MODELS = {
    "repvgg_a0": (lambda: timm.create_model("repvgg_a0", pretrained=False), SHAPE_64),
    "mobileone_s0": (lambda: timm.create_model("mobileone_s0", pretrained=False), SHAPE_64),
    "RepVGGNet": (RepVGGNet, (16, 1, 28, 28)),
    "BlockNet": (BlockNet, (8, 3, 32, 32)),
}


def _quantized_layers(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (QuantizedConv2d, QuantizedLinear))]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lowered_equals_prepared_eval(name):
    build, shape = MODELS[name]
    _, qmodel = prepared(build, shape)
    lowered = repq_fx.lower(qmodel)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected, actual = qmodel(x), lowered(x)
    step = output_step(lowered)
    assert torch.equal(expected.argmax(1), actual.argmax(1))
    assert (expected - actual).abs().max().item() <= step * 1.001
    assert not lowered.training


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_conv_per_block(name):
    """The lowered graph runs exactly one conv per quantized block, and nothing of M(theta)."""
    build, shape = MODELS[name]
    _, qmodel = prepared(build, shape)
    lowered = repq_fx.lower(qmodel)
    blocks = sum(1 for m in qmodel.modules() if isinstance(m, WeightFakeQuant))
    layers = _quantized_layers(lowered)
    assert len(layers) == blocks
    counter = ConvCounter()
    with torch.no_grad(), counter:
        lowered(torch.randn(*shape))
    convs = sum(isinstance(lowered.get_submodule(n.target), QuantizedConv2d) for n in layers)
    assert counter.count == convs
    targets = {n.target for n in lowered.graph.nodes if n.op == "call_function"}
    assert not {t for t in targets if getattr(t, "__name__", "") in ("branch_statistics", "conv2d", "pad")}


def test_each_layer_matches_on_the_same_input():
    """Every layer of random-init repvgg_a0 at BN gain 1 (chaotic end to end), fed the prepared
    model's own input, lands on the prepared model's output grid within one step, and differs
    on a small fraction of elements only (the int32 bias rounding)."""
    _, qmodel = prepared(MODELS["repvgg_a0"][0], SHAPE_64, gain=1.0)
    lowered = repq_fx.lower(qmodel)
    values: dict[str, torch.Tensor] = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = result = super().run_node(n)
            return result

    with torch.no_grad():
        Record(qmodel).run(torch.randn(*SHAPE_64))
    for node in _quantized_layers(lowered):
        layer = lowered.get_submodule(node.target)
        out = node
        while not isinstance(lowered.get_submodule(out.target) if out.op == "call_module" else None,
                             QuantizeDequantize):
            out = next(iter(out.users))  # through the fused ReLU to the output quantizer
        quantizer = lowered.get_submodule(out.target)
        with torch.no_grad():
            y = layer(values[node.args[0].name])
            if out is not next(iter(node.users)):
                y = torch.relu(y)
            diff = (quantizer(y) - values[out.name]).abs() / quantizer.scale
        assert diff.max().item() <= 1.001, node.name
        assert (diff > 0.5).float().mean().item() < 0.01, node.name


def test_weights_are_the_trained_quantized_merged_kernel():
    """int8 weight x per-channel step == Q_w(M(theta)) as the prepared model computes it in eval mode."""
    _, qmodel = prepared(RepVGGNet, (16, 1, 28, 28), repq_fx.QConfig(weight_bits=4, act_bits=4))
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out.detach()))
             for name, m in qmodel.named_modules() if isinstance(m, WeightFakeQuant)]
    with torch.no_grad():
        qmodel(torch.randn(2, 1, 28, 28))
    for h in hooks:
        h.remove()
    lowered = repq_fx.lower(qmodel)
    for node in _quantized_layers(lowered):
        layer = lowered.get_submodule(node.target)
        path = node.target.rpartition(".")[0]
        trained = seen[f"{path}.weight_fake_quant" if path else "weight_fake_quant"]
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        assert torch.equal(layer.weight.float() * layer.weight_scale.reshape(shape), trained.float()), node.target
        lo, hi = -(2 ** (layer.weight_bits - 1)), 2 ** (layer.weight_bits - 1) - 1
        assert lo <= int(layer.weight.min()) and int(layer.weight.max()) <= hi
    bits = sorted({layer.weight_bits for layer in (lowered.get_submodule(n.target) for n in _quantized_layers(lowered))})
    assert bits == [4, 8]  # first and last layer at first_last_bits=8


def test_bias_is_int32_at_input_times_weight_scale():
    _, qmodel = prepared(RepVGGNet, (16, 1, 28, 28))
    lowered = repq_fx.lower(qmodel)
    for node in _quantized_layers(lowered):
        layer = lowered.get_submodule(node.target)
        assert layer.bias.dtype == torch.int32 and layer.weight.dtype == torch.int8
        assert torch.equal(layer.output_scale(), layer.input_scale * layer.weight_scale)


def test_after_training_steps_and_float64():
    """LSQ steps moved by training, a float64 model: lowering still matches the prepared eval model."""
    torch.manual_seed(1)
    model = calibrate_bn(RepVGGNet().double(), (16, 1, 28, 28))
    qmodel = repq_fx.prepare(model, repq_fx.QConfig(bn_mode="batch"))
    repq_fx.calibrate(qmodel, [torch.randn(16, 1, 28, 28, dtype=torch.float64) for _ in range(2)])
    steps_before = [p.detach().clone() for n, p in qmodel.named_parameters() if n.endswith("scale")]
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    qmodel.train()
    for _ in range(3):
        x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
        loss = nn.functional.cross_entropy(qmodel(x), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    steps_after = [p.detach() for n, p in qmodel.named_parameters() if n.endswith("scale")]
    assert any(not torch.equal(a, b) for a, b in zip(steps_before, steps_after))
    lowered = repq_fx.lower(qmodel)
    assert qmodel.training  # lower() leaves its input alone
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = qmodel.eval()(x), lowered(x)
    assert actual.dtype == torch.float64
    assert torch.equal(expected.argmax(1), actual.argmax(1))
    assert (expected - actual).abs().max().item() <= output_step(lowered) * 1.001


@pytest.mark.parametrize("quantizer", ["minmax", "lsq"])
def test_minmax_and_skip(quantizer):
    config = repq_fx.QConfig(weight_quantizer=quantizer, act_quantizer=quantizer, skip=("stages.1.0",))
    _, qmodel = prepared(RepVGGNet, (16, 1, 28, 28), config)
    lowered = repq_fx.lower(qmodel)
    assert not any(n.target.startswith("stages.1.0.") for n in _quantized_layers(lowered))
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        expected, actual = qmodel(x), lowered(x)
    assert torch.equal(expected.argmax(1), actual.argmax(1))
    assert (expected - actual).abs().max().item() <= output_step(lowered) * 1.001


def test_state_dict_round_trip_and_code():
    _, qmodel = prepared(RepVGGNet, (16, 1, 28, 28), seed=2)
    lowered = repq_fx.lower(qmodel)
    buffer = io.BytesIO()
    torch.save(lowered.state_dict(), buffer)
    buffer.seek(0)
    _, other = prepared(RepVGGNet, (16, 1, 28, 28), seed=3)
    fresh = repq_fx.lower(other)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert not torch.equal(fresh(x), lowered(x))
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(fresh(x), lowered(x))
    assert 'stages_0_0_conv = getattr(getattr(self.stages, "0"), "0").quantized_conv(' in lowered.code
    assert "merged_weight" not in lowered.code


def test_torch_export_of_lowered_model():
    _, qmodel = prepared(RepVGGNet, (16, 1, 28, 28))
    lowered = repq_fx.lower(qmodel)
    x = torch.randn(2, 1, 28, 28)
    exported = torch.export.export(lowered, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), lowered(x))


def test_lower_refuses_what_it_cannot_deploy():
    model = calibrate_bn(RepVGGNet(), (16, 1, 28, 28))
    with pytest.raises(repq_fx.NotPreparedError, match="prepare"):
        repq_fx.lower(model)
    qmodel = repq_fx.prepare(model)
    with pytest.raises(repq_fx.NotCalibratedError, match="calibrate"):
        repq_fx.lower(qmodel)
    repq_fx.calibrate(qmodel, [torch.randn(8, 1, 28, 28)])
    repq_fx.disable_fake_quant(qmodel)
    with pytest.raises(repq_fx.NotCalibratedError, match="enable_fake_quant"):
        repq_fx.lower(qmodel)
    repq_fx.enable_fake_quant(qmodel)
    name, step = next((n, p) for n, p in qmodel.named_parameters() if n.endswith("weight_fake_quant.scale"))
    with torch.no_grad():
        step[0] = float("nan")
    with pytest.raises(repq_fx.RepQError, match=name.rpartition(".")[0]):
        repq_fx.lower(qmodel)


def test_lower_names_a_parameter_that_training_turned_to_nan():
    _, qmodel = prepared(RepVGGNet, (16, 1, 28, 28))
    with torch.no_grad():
        qmodel.get_parameter("stages.1.0.rbr_dense.conv.weight")[0, 0, 0, 0] = float("nan")
    with pytest.raises(repq_fx.NonFiniteError, match=r"stages\.1\.0\.rbr_dense\.conv\.weight"):
        repq_fx.lower(qmodel)


def test_lowered_model_keeps_no_dead_float_weights() -> None:
    """Regression: a quantized linear's integer module and quantizers live under the linear's path, so the
    float nn.Linear stayed in the lowered model, and its float weight and bias in state_dict."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    qmodel = repq_fx.prepare(model)
    repq_fx.calibrate(qmodel, [torch.randn(4, 3, 8, 8)])
    lowered = repq_fx.lower(qmodel)
    keys = set(lowered.state_dict())
    assert not keys & {"0.weight", "0.bias", "3.weight", "3.bias"}, sorted(keys)
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in lowered.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(lowered(x), qmodel.eval()(x), atol=float(lowered.get_submodule("3.output_fake_quant").scale) * 1.001)
