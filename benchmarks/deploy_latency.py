"""Deployment latency of timm repvgg_a0 on ONNX Runtime (CPU): repq_fx int8 vs float vs ORT's own PTQ.

Four ONNX Runtime sessions and two PyTorch models, all from one ``timm.create_model(name,
pretrained=False)`` whose BN running statistics are set from calibration images:

- ``ort float``: timm's ``reparameterize_model`` (one conv per block), exported with
  ``torch.onnx.export`` (float32);
- ``ort quantize_static``: ONNX Runtime's own post-training quantization of that float file
  (``quantize_static``, QDQ format, per-channel int8 weights, uint8 activations, after
  ``quant_pre_process``), calibrated on the same images;
- ``ort repq_fx``: ``prepare`` -> ``calibrate`` (same images) -> ``lower`` -> ``export_onnx``;
- ``torch timm-merged`` and ``torch repq_fx lowered``: the PyTorch float model and the lowered
  model's exact float simulation of the integer arithmetic.

Calibration images are photographs from scikit-image, resized to the input size; the timed input
is one of them. Each variant runs ``--runs`` inferences per round after ``--warmup``; rounds
rotate the variant order; the table gives the median over all timed inferences and its ratio.
Session options: ``intra_op_num_threads=--threads``, sequential execution, all graph optimisations.

    .venv/bin/python benchmarks/deploy_latency.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn

from repq_fx.bench import round_robin
from repq_fx.export.runtime import optimized_ops, session

warnings.filterwarnings("ignore")


def images(size: int, count: int) -> list[torch.Tensor]:
    """``count`` 1x3xHxW photographs from skimage.data, ImageNet-normalised."""
    import skimage.data
    from skimage.transform import resize

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat", "hubble_deep_field"]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = []
    for i in range(count):
        img = getattr(skimage.data, names[i % len(names)])()
        h, w = img.shape[:2]
        top, left = (i * 37) % max(1, h - min(h, w) + 1), (i * 53) % max(1, w - min(h, w) + 1)
        side = min(h, w)
        crop = resize(img[top:top + side, left:left + side], (size, size), anti_aliasing=True)
        x = (crop - mean) / std
        out.append(torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32)))
    return out


def set_bn_statistics(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


def quantize_with_ort(float_path: str, out_path: str, calib: list[torch.Tensor], workdir: str) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = os.path.join(workdir, "float_pre.onnx")
    quant_pre_process(float_path, pre)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x.numpy()} for x in calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="repvgg_a0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calib", type=int, default=16, help="calibration images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import timm
    from timm.utils import reparameterize_model

    import repq_fx
    from repq_fx.quant.lowered import QuantizedConv2d

    torch.manual_seed(0)
    calib = images(args.size, args.calib)
    model = set_bn_statistics(timm.create_model(args.model, pretrained=False), calib)
    merged = reparameterize_model(copy.deepcopy(model))
    x = calib[0]
    workdir = tempfile.mkdtemp(prefix="repq_deploy_")
    float_path = os.path.join(workdir, "float.onnx")
    torch.onnx.export(merged, (x,), float_path, input_names=["input"], output_names=["output"],
                      dynamo=True, optimize=True, external_data=False, verbose=False)  # one file: optimized_ops
    ort_int8_path = os.path.join(workdir, "ort_quantize_static.onnx")
    quantize_with_ort(float_path, ort_int8_path, calib, workdir)

    qmodel = repq_fx.prepare(model)
    repq_fx.calibrate(qmodel, calib)
    lowered = repq_fx.lower(qmodel)
    ours_path = os.path.join(workdir, "repq_fx.onnx")
    repq_fx.export_onnx(lowered, (x,), ours_path)

    sessions = {"ort float (timm merged)": session(float_path, args.threads),
                "ort quantize_static": session(ort_int8_path, args.threads),
                "ort repq_fx int8": session(ours_path, args.threads)}
    feeds = {"input": x.numpy()}
    runners = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}

    def torch_runner(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    runners["torch timm merged (float)"] = torch_runner(merged)
    runners["torch repq_fx lowered (int sim)"] = torch_runner(lowered)

    times = round_robin(runners, args.rounds, warmup=args.warmup, repeat=args.runs)
    names = list(runners)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}

    outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
    with torch.no_grad():
        lowered_out = lowered(x).numpy()
        float_out = merged(x).numpy()
    convs = sum(isinstance(m, QuantizedConv2d) for m in lowered.modules())
    print(f"model {args.model}, input 1x3x{args.size}x{args.size}, threads {args.threads}, "
          f"{args.rounds} rounds x {args.runs} runs, torch {torch.__version__}")
    print(f"quantized convs in the lowered model: {convs}")
    for name, path in (("ort float (timm merged)", float_path), ("ort quantize_static", ort_int8_path),
                       ("ort repq_fx int8", ours_path)):
        ops = optimized_ops(path)
        kept = {k: v for k, v in ops.items() if k in ("Conv", "QLinearConv", "QGemm", "Gemm", "FusedConv",
                                                      "QuantizeLinear", "DequantizeLinear")}
        print(f"  {name}: ORT optimized graph {dict(sorted(kept.items()))}")
    base_ort, base_torch = med["ort float (timm merged)"], med["torch timm merged (float)"]
    print("\n| variant | median latency | vs ort float | vs ort quantize_static |")
    print("|---|---:|---:|---:|")
    for name in names:
        base = base_torch if name.startswith("torch") else base_ort
        vs_qs = f"{med[name] / med['ort quantize_static']:.2f}x" if name.startswith("ort") else ""
        ref = "vs torch float" if name.startswith("torch") else ""
        print(f"| {name} | {med[name]:.2f} ms | {med[name] / base:.2f}x {ref} | {vs_qs} |")
    speedup = base_ort / med["ort repq_fx int8"]
    print(f"\nspeedup of repq_fx int8 over float ONNX: {speedup:.2f}x (goal >= 3.0x)")
    print(f"repq_fx int8 / quantize_static latency: {med['ort repq_fx int8'] / med['ort quantize_static']:.2f}x "
          "(goal <= 1.1x)")
    print(f"lowered torch / timm merged torch latency: {med['torch repq_fx lowered (int sim)'] / base_torch:.2f}x")
    from repq_fx.quant.lowered import QuantizeDequantize
    step = float([m for m in lowered.modules() if isinstance(m, QuantizeDequantize)][-1].scale)
    top = lambda a: int(np.argmax(a))  # noqa: E731
    print(f"top-1 class: float {top(float_out)}, ort quantize_static {top(outputs['ort quantize_static'])}, "
          f"repq_fx ort {top(outputs['ort repq_fx int8'])}, repq_fx lowered {top(lowered_out)}; "
          f"|ort repq_fx - lowered| <= {np.abs(outputs['ort repq_fx int8'] - lowered_out).max() / step:.1f} "
          "output steps")


if __name__ == "__main__":
    main()
