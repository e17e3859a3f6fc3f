"""The deployment files ``repq-fx export --format`` writes, one row per runtime.

Every format starts from the same lowered model (:func:`repq_fx.lower`): QDQ ONNX for ONNX Runtime
(and TensorRT), an OpenVINO IR converted from that ONNX file, and an ExecuTorch ``.pte`` whose
int8 convs XNNPACK runs. A row says how to write the file and how to check it against the lowered
model in its runtime; a check raises :class:`~repq_fx.errors.ExportCheckError` and returns one
line to print when it passes.

>>> format_for("model.pte").name, format_for("model.xml").name, format_for("m.onnx", "onnx").name
('pte', 'openvino', 'onnx')
>>> format_for("model.onnx", "openvino")
Traceback (most recent call last):
...
repq_fx.errors.ConfigError: format openvino writes a .xml file, but the path 'model.onnx' ends in '.onnx'; name it model.xml
>>> format_for("model.tflite")
Traceback (most recent call last):
...
repq_fx.errors.ConfigError: cannot tell the format of 'model.tflite' from its suffix; name it .onnx, .pte or .xml, or pass --format onnx|pte|openvino
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..errors import ConfigError, ExportCheckError

Writer = Callable[[fx.GraphModule, torch.Tensor, str, "str | None"], str]
Checker = Callable[[str, fx.GraphModule, torch.Tensor, "str | None"], str]
Runner = Callable[[torch.Tensor], torch.Tensor]  # a batch of inputs -> the model's (first) output


@dataclass(frozen=True)
class Format:
    """One deployment file: its name on the command line, suffix, runtime package, writer and checker."""

    name: str
    suffix: str
    package: str  # the Python package that runs (and for pte/openvino writes) the file
    runtime: str  # the runtime's name, for messages
    write: Writer  # (lowered, batch-1 example, path, target) -> one line describing the file
    check: Checker  # (path, lowered, random inputs, target) -> what passed; raises ExportCheckError
    load: Callable[[str, int], Runner]  # (path, threads) -> run the file on a batch

    @property
    def available(self) -> bool:
        """Whether this machine has the runtime's package (``make setup`` installs all of them)."""
        return importlib.util.find_spec(self.package) is not None


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a row to :data:`FORMATS` (a name already there is replaced)."""
    if not isinstance(fmt, Format):
        raise ConfigError(f"register_format() takes a Format; got {type(fmt).__name__}")
    FORMATS[fmt.name] = fmt
    return fmt


def format_for(path: str, name: str | None = None) -> Format:
    """The format ``name``, else the one ``path``'s suffix names; a :class:`ConfigError` when neither says, or
    when ``path`` does not end in the suffix of format ``name`` (a file is never written under another
    format's name, where it would replace that format's file)."""
    root, suffix = os.path.splitext(path)
    suffix = suffix.lower()
    if name is not None:
        if name not in FORMATS:
            raise ConfigError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
        fmt = FORMATS[name]
        if suffix != fmt.suffix:
            raise ConfigError(f"format {name} writes a {fmt.suffix} file, but the path {path!r} "
                              f"{f'ends in {suffix!r}' if suffix else 'has no suffix'}; name it {root}{fmt.suffix}")
        return fmt
    for fmt in FORMATS.values():
        if fmt.suffix == suffix:
            return fmt
    raise ConfigError(f"cannot tell the format of {path!r} from its suffix; name it "
                      f"{', '.join(f.suffix for f in list(FORMATS.values())[:-1])} or "
                      f"{list(FORMATS.values())[-1].suffix}, or pass --format {'|'.join(FORMATS)}")


def _write_onnx(lowered: fx.GraphModule, example: torch.Tensor, path: str, target: str | None) -> str:
    from .onnx_qdq import export_qdq

    export_qdq(lowered, (example,), path, target=target)
    return f"QDQ ONNX for ONNX Runtime (batch dynamic), target {target or lowered.repq_target}"


def _check_onnx(path: str, lowered: fx.GraphModule, inputs: torch.Tensor, target: str | None) -> str:
    """The file's form for its target (:mod:`~repq_fx.export.tensorrt_check`), then ONNX Runtime layer by layer."""
    import onnx

    from ..targets import get_target
    from .parity import check_onnx_runtime
    from .tensorrt_check import require_target_form

    scheme = get_target(target or getattr(lowered, "repq_target", None) or "onnxruntime")
    form = (f"{path} has the Q/DQ form target {scheme.name!r} runs in int8 (symmetric int8, fusable)\n"
            if require_target_form(onnx.load(path), path, lowered, scheme) else "")
    parity = check_onnx_runtime(path, lowered, (inputs,))
    return f"{form}ONNX Runtime vs lowered PyTorch on {inputs.shape[0]} random inputs: {parity}"


def _load_onnx(path: str, threads: int) -> Runner:
    from .runtime import session

    ort_session = session(path, threads)
    name = ort_session.get_inputs()[0].name
    return lambda x: torch.from_numpy(ort_session.run(None, {name: x.numpy()})[0])


def _beside(path: str, suffix: str) -> str:
    return os.path.splitext(path)[0] + suffix


def _write_openvino(lowered: fx.GraphModule, example: torch.Tensor, path: str, target: str | None) -> str:
    """The IR converted from the QDQ ONNX, which is written to a temporary folder (never beside ``path``,
    where it would replace a file of the user's)."""
    from .openvino_ir import require_exact_in_openvino, save_ir

    require_exact_in_openvino(lowered, target)
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = os.path.join(folder, "model.onnx")
        _write_onnx(lowered, example, onnx_path, target)
        save_ir(onnx_path, path)
    return f"OpenVINO IR ({os.path.basename(_beside(path, '.bin'))} beside it), converted from the QDQ ONNX"


def _check_openvino(path: str, lowered: fx.GraphModule, inputs: torch.Tensor, target: str | None) -> str:
    """The written IR end to end; layer by layer on the QDQ ONNX it was converted from (cut by
    :func:`~repq_fx.export.parity.segment_parity`, which reads ONNX), written again to a temporary folder."""
    from .openvino_ir import check_openvino

    with tempfile.TemporaryDirectory() as folder:
        onnx_path = os.path.join(folder, "model.onnx")
        _write_onnx(lowered, inputs[:1], onnx_path, target)
        result = check_openvino(onnx_path, lowered, (inputs,), deployed=path)
    return f"OpenVINO IR {os.path.basename(path)} vs lowered PyTorch on {inputs.shape[0]} random inputs: {result}"


def _load_openvino(path: str, threads: int) -> Runner:
    from .openvino_ir import compile_model, run

    compiled = compile_model(path, threads)
    return lambda x: torch.from_numpy(run(compiled, (x,))[0])


def _write_pte(lowered: fx.GraphModule, example: torch.Tensor, path: str, target: str | None) -> str:
    from .executorch_pte import export_pte

    result = export_pte(lowered, (example,), path, check=False)
    return f"ExecuTorch program, input {'x'.join(map(str, example.shape))} (static); {result.delegation}"


def _check_pte(path: str, lowered: fx.GraphModule, inputs: torch.Tensor, target: str | None) -> str:
    """The program has a static batch of one: each input runs alone, and every output must be within one step."""
    from .executorch_pte import load_pte, run_pte
    from .parity import AGREEMENT, step_agreement

    method = load_pte(path)
    within, worst = 1.0, 0.0
    for x in inputs.split(1):
        w, m, _ = step_agreement(run_pte(method, (x,)), lowered, (x,))
        within, worst = min(within, w), max(worst, m)
    line = (f"ExecuTorch/XNNPACK vs lowered PyTorch on {inputs.shape[0]} random inputs: "
            f"{100 * within:.2f} % of outputs within one step in the worst input (max {worst:.1f} steps)")
    if within < AGREEMENT:
        raise ExportCheckError(line)
    return line


def _load_pte(path: str, threads: int) -> Runner:
    """The program's batch is static (one): a batch runs image by image."""
    from .executorch_pte import load_pte, run_pte

    method = load_pte(path, threads)
    return lambda x: torch.cat([run_pte(method, (row,))[0] for row in x.split(1)])


register_format(Format("onnx", ".onnx", "onnxruntime", "ONNX Runtime", _write_onnx, _check_onnx, _load_onnx))
register_format(Format("pte", ".pte", "executorch", "ExecuTorch (XNNPACK)", _write_pte, _check_pte, _load_pte))
register_format(Format("openvino", ".xml", "openvino", "OpenVINO", _write_openvino, _check_openvino,
                       _load_openvino))

__all__ = ["Format", "FORMATS", "register_format", "format_for"]
