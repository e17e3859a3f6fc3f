"""Hostile and unusual inputs: what repq_fx handles, keeps as it is, or refuses.

Each :class:`Case` is a small model and the outcome ``tests/test_hostile.py`` checks for it:

- ``"handled"``: ``merge`` equals ``model.eval()`` (float64: relative error <= 1e-9) and ``prepare``
  with fake quant off equals the original in train and eval mode (same random numbers);
- ``"kept as is"``: the same, but part of the model is not merged (left as the user wrote it,
  in float); ``explain`` says why with ``reason`` in its text;
- ``"refused"``: ``merge`` and ``prepare`` raise ``error`` (a :class:`~repq_fx.RepQError`) whose
  message contains ``reason`` and says what to do.

``python -m repq_fx.testing.cases`` prints the table in README.md ("What repq_fx handles / refuses").

>>> print(markdown_table().splitlines()[0])
| input | outcome | what repq_fx does |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AlreadyPreparedError, CaptureError, InvalidModelError, NonFiniteError, RepQError
from .blocks import RepVGGBlock

C = 4  # channels of every case model
SPATIAL = (9, 11)


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------

def _conv_bn(c_in: int = C, c_out: int = C, k: int = 3, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=kw.pop("padding", k // 2), **kw), nn.BatchNorm2d(c_out))


class SharedConvSequential(nn.Module):
    """One conv module called twice in sequence, with a different BN after each call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(C), nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))


class SharedConvParallel(nn.Module):
    """One conv module called twice on the same input, in two branches of one block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(C), nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


class SharedBlock(nn.Module):
    """One RepVGG block (BNs included) applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.block(x))


class Loop(nn.Module):
    """conv -> BN -> ReLU called three times in a Python loop (conv and BN shared)."""

    def __init__(self, steps: int = 3) -> None:
        super().__init__()
        self.steps = steps
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            x = torch.relu(self.bn(self.conv(x)))
        return x


class Conv1dBlock(nn.Module):
    """A RepVGG-style block in 1-d: ``BN(conv3) + BN(conv1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv1d(C, C, 3, padding=1), nn.BatchNorm1d(C))
        self.point = nn.Sequential(nn.Conv1d(C, C, 1), nn.BatchNorm1d(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense(x) + self.point(x))


class FunctionalConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, C, 3) / 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight, padding=1)


class DropPath(nn.Module):
    """Stochastic depth (as timm's DropPath: kept as a module by class name, so it follows train/eval)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class BranchWithStochasticOp(nn.Module):
    """``BN(conv3(x)) + drop(BN(conv1(x)))``: MobileOne/FastViT-style, with DropPath or Dropout."""

    def __init__(self, drop: nn.Module | None = None, functional_p: float = 0.0) -> None:
        super().__init__()
        self.dense, self.point = _conv_bn(), _conv_bn(k=1)
        self.drop = drop if drop is not None else nn.Identity()
        self.functional_p = functional_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.point(x))
        if self.functional_p:
            y = F.dropout(y, self.functional_p, self.training)
        return self.dense(x) + y


class ReflectBranchBlock(nn.Module):
    """A RepVGG-style block whose 3x3 branch pads by reflection."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.dense = nn.Sequential(
            nn.Conv2d(C, C, 3, padding=0 if functional else 1, padding_mode="zeros" if functional else "reflect"),
            nn.BatchNorm2d(C))
        self.point = _conv_bn(k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense_in = F.pad(x, (1, 1, 1, 1), mode="reflect") if self.functional else x
        return self.dense(dense_in) + self.point(x)


class FunctionalSamePadding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, C, 3, 3) / 6)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv2d(x, self.weight, padding="same"))


class SqueezeExcite(nn.Module):
    """A RepVGG block with the squeeze-excitation of the official RepVGG/MobileOne code: the pooling
    window is read from the input at run time (``F.avg_pool2d(x, kernel_size=x.size(3))``)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(C, C)
        self.down, self.up = nn.Conv2d(C, 2, 1), nn.Conv2d(2, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        s = F.avg_pool2d(y, kernel_size=(y.size(2), y.size(3)))
        return y * torch.sigmoid(self.up(F.relu(self.down(s))))


class DynamicConv(nn.Module):
    """A conv whose kernel is computed from the input (CondConv / dynamic-conv style)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, C, 3, 3) / 6)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv2d(x, self.weight * torch.sigmoid(x.mean()), padding=1))


def _with_conv_hook() -> nn.Module:
    model = nn.Sequential(_conv_bn(), nn.ReLU(), _conv_bn(k=1))
    model[0][0].register_forward_hook(_double_output)
    return model


def _double_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * 2


def _with_root_hook() -> nn.Module:
    model = RepVGGBlock(C, C)
    model.register_forward_hook(_double_output)
    return model


def _weight_norm_parametrized() -> nn.Module:
    model = nn.Sequential(_conv_bn(), nn.ReLU(), _conv_bn(k=1))
    nn.utils.parametrizations.weight_norm(model[0][0])
    return model


def _weight_norm_hook(evaluated: bool = True) -> nn.Module:
    """The deprecated hook form; ``evaluated``: after a forward under ``no_grad`` (else it cannot be copied)."""
    import warnings
    model = nn.Sequential(_conv_bn(), nn.ReLU(), _conv_bn(k=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        nn.utils.weight_norm(model[0][0])
    if evaluated:
        with torch.no_grad():
            model.eval()(torch.zeros(1, C, 3, 3))
    return model


def _spectral_norm() -> nn.Module:
    model = nn.Sequential(_conv_bn(), nn.ReLU(), _conv_bn(k=1))
    nn.utils.parametrizations.spectral_norm(model[0][0])
    return model


def _lazy() -> nn.Module:
    return nn.Sequential(nn.LazyConv2d(C, 3, padding=1), nn.BatchNorm2d(C))


def _already_merged() -> nn.Module:
    from ..api import merge
    return merge(randomized(RepVGGBlock(C, C)))


def _already_prepared() -> nn.Module:
    from ..api import prepare
    return prepare(randomized(RepVGGBlock(C, C)))


def _torch_ao_prepared() -> nn.Module:
    from torch.ao.quantization import FakeQuantize
    model = nn.Sequential(_conv_bn(), FakeQuantize())
    return model


def _nan_weight() -> nn.Module:
    model = randomized(RepVGGBlock(C, C))
    with torch.no_grad():
        model.rbr_dense.conv.weight[0, 0, 0, 0] = float("nan")
    return model


def _inf_running_var() -> nn.Module:
    model = randomized(RepVGGBlock(C, C))
    with torch.no_grad():
        model.rbr_identity.running_var[1] = float("inf")
    return model


def _negative_running_var() -> nn.Module:
    model = randomized(RepVGGBlock(C, C))
    with torch.no_grad():
        model.rbr_1x1.bn.running_var[2] = -0.5
    return model


# ---------------------------------------------------------------------------
# Cases.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One hostile or unusual input and what repq_fx does with it."""

    id: str  # pytest id
    input: str  # README: what the user brings
    make: Callable[[], nn.Module]
    outcome: str  # "handled" | "kept as is" | "refused"
    what: str  # README: what repq_fx does
    reason: str = ""  # "kept as is": text in explain(); "refused": text in the error message
    error: type[RepQError] | None = None  # "refused": the error merge and prepare raise
    input_shape: tuple[int, ...] = (2, C, *SPATIAL)
    dtype: torch.dtype = torch.float64
    channels_last: bool = False
    randomize: bool = True  # perturb BN statistics/affine parameters before use
    row: str = ""  # README row (cases with the same row share one; "" = ``input``)


def _case(*args, **kwargs) -> Case:
    return Case(*args, **kwargs)


# README rows shared by several cases
_SHARING = "weight sharing: one conv called twice (in sequence or in two branches), a block called twice"
_OTHER_CONVS = "Conv1d, Conv3d, ConvTranspose2d (modules or functional)"
_PADDING = "padding modes other than zeros (Conv2d padding_mode, F.pad mode) inside a block"
_STOCHASTIC = "DropPath / Dropout / F.dropout with p > 0 inside a block"
_HOOKS = "forward hooks on a conv (including the deprecated hook-based weight_norm)"
_PREPARED = "an already prepared model (by repq_fx.prepare or torch.ao.quantization)"
_NON_FINITE = "NaN/Inf in weights or BN statistics, negative running variance"


CASES: tuple[Case, ...] = (
    # -- handled ------------------------------------------------------------------------------
    _case("shared-conv-sequential", "weight sharing: one conv called twice in sequence", SharedConvSequential,
          "handled", "one block per call, all on the shared parameters (a training step moves them once, "
                     "with the summed gradient)", row=_SHARING),
    _case("shared-conv-parallel", "weight sharing: one conv in two branches of a block", SharedConvParallel,
          "handled", "merged into one conv", row=_SHARING),
    _case("shared-block", "a whole re-parametrized block called twice", SharedBlock, "handled",
          "one block per call; shared BNs update their running statistics once per call", row=_SHARING),
    _case("loop", "a module called in a Python loop", Loop, "handled",
          "unrolled by tracing: one block per iteration, on the same parameters"),
    _case("channels-last", "channels_last model and/or input", lambda: RepVGGBlock(C, C), "handled",
          "merged and prepared as usual", channels_last=True),
    _case("float16", "float16 model", lambda: RepVGGBlock(C, C), "handled",
          "merged in float64 and rounded once (no less accurate than the original); prepare keeps the dtype",
          dtype=torch.float16, row="float16 / bfloat16 model"),
    _case("bfloat16", "bfloat16 model", lambda: RepVGGBlock(C, C), "handled", "as float16",
          dtype=torch.bfloat16, row="float16 / bfloat16 model"),
    _case("no-convs", "a model with no convs", lambda: nn.Sequential(nn.BatchNorm2d(C), nn.ReLU(), nn.AvgPool2d(2)),
          "handled", "nothing to merge (explain says so); merge returns an equivalent module, prepare one "
                     "without quantizers"),
    _case("already-merged", "an already merged model (output of merge)", _already_merged, "handled",
          "merging again changes nothing; it can be prepared like any model", randomize=False),
    _case("bn-affine-false", "BatchNorm with affine=False",
          lambda: nn.Sequential(_conv_bn(), nn.ReLU(), nn.Conv2d(C, C, 1), nn.BatchNorm2d(C, affine=False)),
          "handled", "folded (scale 1, shift 0)"),
    _case("sync-bn", "SyncBatchNorm", lambda: nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.SyncBatchNorm(C)),
          "handled", "as BatchNorm on one process; in a process group the statistics inside blocks are "
                     "those of the global batch (quant/sync_stats.py)"),
    _case("root-forward-hook", "a forward hook on the model itself", _with_root_hook, "handled",
          "torch.fx would drop it, so the model is captured with torch.export, which keeps it (explain says so)"),
    _case("squeeze-excitation", "squeeze-excitation pooling over a window read from the input "
          "(F.avg_pool2d(x, x.size(3)))", SqueezeExcite, "handled",
          "the run-time size is a boundary between blocks, not a crash; the convs on either side are blocks"),
    _case("functional-same-padding", "F.conv2d(x, w, padding='same')", FunctionalSamePadding, "handled",
          "'same' is resolved from the kernel size (odd kernels)"),
    # -- kept as is ---------------------------------------------------------------------------
    _case("conv1d", "Conv1d blocks", Conv1dBlock, "kept as is", "left as they are, in float; explain names them",
          reason="only 2-d convolutions", input_shape=(2, C, 13), row=_OTHER_CONVS),
    _case("functional-conv1d", "F.conv1d", FunctionalConv1d, "kept as is", "as Conv1d",
          reason="only 2-d convolutions", input_shape=(2, C, 13), row=_OTHER_CONVS),
    _case("conv3d", "Conv3d", lambda: nn.Sequential(nn.Conv3d(C, C, 3, padding=1), nn.BatchNorm3d(C)),
          "kept as is", "as Conv1d", reason="only 2-d convolutions", input_shape=(2, C, 5, 6, 7), row=_OTHER_CONVS),
    _case("conv-transpose", "ConvTranspose2d",
          lambda: nn.Sequential(nn.ConvTranspose2d(C, C, 3, padding=1), nn.BatchNorm2d(C)), "kept as is",
          "as Conv1d", reason="transposed convolution", row=_OTHER_CONVS),
    _case("lone-bn", "a BatchNorm between non-linear ops (no conv next to it)",
          lambda: nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(C), nn.ReLU()),
          "kept as is", "it stays a BatchNorm (explain counts such BNs); the conv is a block of its own",
          reason="no conv to fold them into"),
    _case("bn-no-running-stats", "BatchNorm with track_running_stats=False",
          lambda: nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C, track_running_stats=False)),
          "kept as is", "the BN stays (it uses batch statistics even in eval mode); the conv before it is a block",
          reason="track_running_stats=False"),
    _case("padding-mode-reflect", "Conv2d(padding_mode='reflect') in a block", ReflectBranchBlock, "kept as is",
          "that conv or pad stays as it is, with the reason in explain; the rest of the block is still merged",
          reason="padding_mode='reflect'", row=_PADDING),
    _case("pad-reflect", "F.pad(mode='reflect') in a block", lambda: ReflectBranchBlock(functional=True),
          "kept as is", "as padding_mode", reason="pad mode 'reflect'", row=_PADDING),
    _case("drop-path", "DropPath(p > 0) on a branch", lambda: BranchWithStochasticOp(DropPath(0.2)), "kept as is",
          "kept outside blocks: the branches on either side are merged separately, explain says why "
          "(rate 0 is the identity and merged through)", reason="DropPath(p=0.2) is random in train mode",
          row=_STOCHASTIC),
    _case("dropout-in-branch", "Dropout(p > 0) inside a block", lambda: BranchWithStochasticOp(nn.Dropout(0.2)),
          "kept as is", "as DropPath", reason="Dropout(p=0.2) is random in train mode", row=_STOCHASTIC),
    _case("functional-dropout", "F.dropout(x, p, self.training) inside a block",
          lambda: BranchWithStochasticOp(functional_p=0.2), "kept as is", "as DropPath",
          reason="Dropout(p=0.2) is random in train mode", row=_STOCHASTIC),
    _case("dynamic-conv", "a conv whose kernel is computed from the input", DynamicConv, "kept as is",
          "left as it is, in float", reason="depends on the input"),
    _case("conv-forward-hook", "a forward hook on a conv", _with_conv_hook, "kept as is",
          "the conv is left as it is, so its hook still runs", reason="has hooks", row=_HOOKS),
    _case("weight-norm-hook", "weight_norm (deprecated hook form), after a no_grad forward", _weight_norm_hook,
          "kept as is", "as a forward hook", reason="has hooks", row=_HOOKS),
    _case("weight-norm", "weight_norm (torch.nn.utils.parametrizations)", _weight_norm_parametrized, "kept as is",
          "the conv is left as it is (remove_parametrizations first to merge it)", reason="parametrized",
          row="weight_norm / spectral_norm (torch.nn.utils.parametrizations)"),
    _case("spectral-norm", "spectral_norm (torch.nn.utils.parametrizations)", _spectral_norm, "kept as is",
          "as weight_norm", reason="parametrized",
          row="weight_norm / spectral_norm (torch.nn.utils.parametrizations)"),
    # -- refused ------------------------------------------------------------------------------
    _case("weight-norm-hook-fresh", "weight_norm (deprecated hook form), right after weight_norm()",
          lambda: _weight_norm_hook(evaluated=False), "refused",
          "CaptureError: such a model cannot be deep-copied; use parametrizations.weight_norm",
          reason="torch.nn.utils.weight_norm", error=CaptureError),
    _case("already-prepared", "an already prepared model (output of prepare)", _already_prepared, "refused",
          "AlreadyPreparedError: pass the float model (lower() deploys a prepared one)",
          reason="already prepared", error=AlreadyPreparedError, randomize=False, row=_PREPARED),
    _case("torch-ao-prepared", "a model prepared by torch.ao.quantization", _torch_ao_prepared, "refused",
          "as above", reason="torch.ao.quantization", error=AlreadyPreparedError, row=_PREPARED),
    _case("lazy", "uninitialized lazy modules (LazyConv2d)", _lazy, "refused",
          "InvalidModelError: run one forward pass first", reason="uninitialized", error=InvalidModelError,
          randomize=False),
    _case("nan-weight", "NaN in a conv weight", _nan_weight, "refused",
          "NonFiniteError naming each bad parameter or buffer (explain shows it as a warning)",
          reason="rbr_dense.conv.weight", error=NonFiniteError, randomize=False, row=_NON_FINITE),
    _case("inf-running-var", "Inf in BN running statistics", _inf_running_var, "refused",
          "as NaN", reason="rbr_identity.running_var", error=NonFiniteError, randomize=False, row=_NON_FINITE),
    _case("negative-running-var", "negative BN running variance", _negative_running_var, "refused",
          "as NaN", reason="rbr_1x1.bn.running_var", error=NonFiniteError, randomize=False, row=_NON_FINITE),
)


# ---------------------------------------------------------------------------
# Helpers shared with the tests.
# ---------------------------------------------------------------------------

def randomized(module: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """``module`` in ``dtype`` and eval mode, with random BN statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    module = module.to(dtype)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))
    return module.eval()


def build(case: Case) -> nn.Module:
    """The case's model, seeded, in its dtype (and memory format), eval mode."""
    torch.manual_seed(0)
    model = case.make()
    if case.randomize:
        model = randomized(model, dtype=case.dtype)
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def example_input(case: Case, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*case.input_shape, generator=g, dtype=torch.float64) + 0.5).to(case.dtype)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


def markdown_table(cases: tuple[Case, ...] = CASES) -> str:
    """The README table: one row per ``row`` (the first case of a row gives its outcome and text)."""
    rows = ["| input | outcome | what repq_fx does |", "|---|---|---|"]
    seen: set[str] = set()
    for c in cases:
        label = c.row or c.input
        if label in seen:
            continue
        seen.add(label)
        outcomes = dict.fromkeys(d.outcome for d in cases if (d.row or d.input) == label)
        rows.append(f"| {label} | {' / '.join(outcomes)} | {c.what} |")
    return "\n".join(rows)


def main() -> None:
    print(markdown_table())


if __name__ == "__main__":
    main()


__all__ = ["Case", "CASES", "markdown_table", "randomized", "build", "example_input"]
