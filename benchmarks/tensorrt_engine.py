"""TensorRT engines of timm repvgg_a0: repq_fx's int8 QDQ file (target "tensorrt") vs the merged float model in fp16.

One short run for a machine with an NVIDIA GPU and the ``tensorrt`` Python package (``pip install
tensorrt``; 10.x or 11.x). Steps:

1. ``timm.create_model("repvgg_a0", pretrained=False)``, BN running statistics set from random images
   and BN weights halved (a contractive network, as a trained one mostly is: in a random one a single
   rounding tie grows through the layers, see tests/quantized_models.py);
2. ``repq_fx.prepare(QConfig(target="tensorrt"))`` -> ``calibrate`` (random images) -> ``lower`` ->
   ``export_onnx``: the int8 QDQ file (symmetric int8 activations, weights in [-127, 127]), checked with
   ``repq_fx.export.tensorrt_check.check_tensorrt_qdq``; and ``repq_fx.merge`` of the same model
   exported in float16: the fp16 baseline;
3. (not with ``--dry-run``) TensorRT engines, dynamic batch 1..``--max-batch``: the int8 engine from the
   QDQ file by explicit quantization (TensorRT 10: builder flags INT8 + FP16, so the layers outside
   Q/DQ may run in fp16; TensorRT 11 removed those flags: every network is strongly typed, the Q/DQ
   pairs make the convs int8 and the rest keeps the file's float32), and the fp16 engine of the
   float16 file (flag FP16 on TensorRT 10);
4. parity on ``--images`` random images: the int8 engine against the lowered PyTorch model (run on the
   CPU: exact integer arithmetic), in output quantization steps and top-1 agreement; and against the
   fp16 engine (top-1 agreement, largest difference relative to the largest output);
5. latency at batch 1 and 32: ``--warmup`` runs, then the median of ``--runs`` runs, each timed alone
   with CUDA events on one stream; a markdown table.

    python benchmarks/tensorrt_engine.py                 # on the GPU machine: about 2-4 minutes
    python benchmarks/tensorrt_engine.py --dry-run       # any machine: steps 1-2 only (no tensorrt, no GPU)
    python benchmarks/tensorrt_engine.py --dry-run --ort-check   # ... and the int8 file in ONNX Runtime, per layer

``--dry-run`` stops before TensorRT and needs neither a GPU nor ``tensorrt``; the ONNX files stay in
``--out-dir``. ``tensorrt`` is imported only after the dry-run point.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import repq_fx  # noqa: E402
from repq_fx.export.float_onnx import export_float  # noqa: E402

MODEL = "repvgg_a0"
BATCHES = (1, 32)


def build_model(size: int, seed: int) -> nn.Module:
    """timm repvgg_a0 with BN running statistics from random images and BN weights halved; eval mode."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(0.5)
    return model.eval()


def export_files(model: nn.Module, size: int, out_dir: Path, calib_batches: int) -> tuple:
    """The int8 QDQ file (target "tensorrt") and the float16 file of the merged model; returns
    ``(lowered, int8 path, fp16 path, problems of the structural check)``."""
    from repq_fx.export.tensorrt_check import check_tensorrt_qdq

    example = torch.randn(1, 3, size, size)
    qmodel = repq_fx.prepare(model, repq_fx.QConfig(target="tensorrt"))
    repq_fx.calibrate(qmodel.eval(), [torch.randn(8, 3, size, size) for _ in range(calib_batches)])
    lowered = repq_fx.lower(qmodel)
    int8_path, fp16_path = out_dir / f"{MODEL}_tensorrt_int8.onnx", out_dir / f"{MODEL}_fp16.onnx"
    proto = repq_fx.export_onnx(lowered, (example,), str(int8_path))
    merged = repq_fx.merge(model).half()
    export_float(merged, (example.half(),), str(fp16_path))
    return lowered, int8_path, fp16_path, check_tensorrt_qdq(proto)


# --- TensorRT (imported lazily: not needed for --dry-run) ------------------------------------------

def build_engine(onnx_path: Path, flags: tuple[str, ...], size: int, max_batch: int):
    """A deserialized engine of ``onnx_path`` with a dynamic batch 1..``max_batch``; ``flags``: builder
    flags set where this TensorRT still has them (10.x: INT8, FP16; 11.x has none: strong typing)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    explicit = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    used = []
    for flag in flags:
        if hasattr(trt.BuilderFlag, flag):
            config.set_flag(getattr(trt.BuilderFlag, flag))
            used.append(flag)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (1, 3, size, size), (max_batch, 3, size, size), (max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    seconds = time.perf_counter() - start
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    return engine, used, seconds, trt.__version__


class Runner:
    """One execution context of an engine, its input and output in CUDA tensors (torch owns the memory)."""

    def __init__(self, engine) -> None:
        import tensorrt as trt

        self.engine, self.context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.INT8: torch.int8, trt.DataType.INT32: torch.int32}
        self.in_dtype = dtypes[engine.get_tensor_dtype(self.input)]
        self.out_dtype = dtypes[engine.get_tensor_dtype(self.output)]
        self.stream = torch.cuda.Stream()

    def bind(self, x: torch.Tensor) -> torch.Tensor:
        """Set the input (copied to the GPU in the engine's dtype); returns the output tensor it writes."""
        self._x = x.to("cuda", self.in_dtype).contiguous()
        self.context.set_input_shape(self.input, tuple(self._x.shape))
        self._y = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.out_dtype, device="cuda")
        self.context.set_tensor_address(self.input, self._x.data_ptr())
        self.context.set_tensor_address(self.output, self._y.data_ptr())
        return self._y

    def run(self) -> None:
        self.context.execute_async_v3(self.stream.cuda_stream)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bind(x)
        self.run()
        self.stream.synchronize()
        return y.float().cpu()

    def latency_ms(self, batch: int, size: int, warmup: int, runs: int) -> float:
        self.bind(torch.randn(batch, 3, size, size))
        for _ in range(warmup):
            self.run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(runs):
            start.record(self.stream)
            self.run()
            end.record(self.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def parity(lowered, int8: Runner, fp16: Runner, images: torch.Tensor) -> dict[str, float]:
    from repq_fx.export.parity import output_steps

    with torch.no_grad():
        reference = lowered(images)  # CPU, exact integer arithmetic
    got, half = int8(images), fp16(images)
    step = output_steps(lowered)[0]
    steps = (got - reference).abs() / step
    return {"within one step": float((steps <= 1.001).float().mean()), "max steps": float(steps.max()),
            "top-1 vs lowered": float((got.argmax(1) == reference.argmax(1)).float().mean()),
            "top-1 vs fp16": float((got.argmax(1) == half.argmax(1)).float().mean()),
            "max |int8 - fp16| / max |fp16|": float((got - half).abs().max() / half.abs().max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="export and check the ONNX files only (no TensorRT)")
    p.add_argument("--ort-check", action="store_true", help="also run the int8 file layer by layer in ONNX "
                   "Runtime (CPU) against the lowered model")
    p.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument("--out-dir", default="tensorrt_engine_out", help="where the ONNX files go")
    p.add_argument("--calib-batches", type=int, default=4, help="random batches of 8 that set activation steps")
    p.add_argument("--images", type=int, default=16, help="random images for parity")
    p.add_argument("--max-batch", type=int, default=max(BATCHES))
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    warnings.filterwarnings("ignore")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    model = build_model(args.size, args.seed)
    lowered, int8_path, fp16_path, problems = export_files(model, args.size, out_dir, args.calib_batches)
    print(f"{MODEL} at {args.size}x{args.size}: {lowered.lowered_layers} int8 layers -> {int8_path} "
          f"({int8_path.stat().st_size / 2**20:.1f} MiB), merged fp16 -> {fp16_path} "
          f"({fp16_path.stat().st_size / 2**20:.1f} MiB), {time.perf_counter() - start:.0f} s")
    print("TensorRT Q/DQ check: " + ("ok (symmetric int8, fusable)" if not problems else "; ".join(problems)))
    if problems:
        return 1
    if args.ort_check:  # the file against the lowered model, layer by layer, in ONNX Runtime on the CPU
        from repq_fx.export.parity import segment_parity

        segments = segment_parity(str(int8_path), lowered, (torch.randn(4, 3, args.size, args.size),))
        worst = max((s for s in segments if s.layers), key=lambda s: s.max_steps)
        print(f"ONNX Runtime layer by layer: {sum(s.ok for s in segments)} of {len(segments)} quantizers within "
              f"one step on >= 99.9 % of their outputs; worst layer {worst}")
    if args.dry_run:
        print("--dry-run: stopping before TensorRT")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run, or on a machine with an NVIDIA GPU")
        return 1

    int8_engine, int8_flags, int8_build, version = build_engine(int8_path, ("INT8", "FP16"), args.size,
                                                                 args.max_batch)
    fp16_engine, fp16_flags, fp16_build, _ = build_engine(fp16_path, ("FP16",), args.size, args.max_batch)
    print(f"TensorRT {version} on {torch.cuda.get_device_name()}: int8 engine built in {int8_build:.0f} s "
          f"(flags {'+'.join(int8_flags) or 'none: strongly typed'}), fp16 in {fp16_build:.0f} s "
          f"(flags {'+'.join(fp16_flags) or 'none: strongly typed'})")
    int8, fp16 = Runner(int8_engine), Runner(fp16_engine)

    torch.manual_seed(args.seed + 1)
    figures = parity(lowered, int8, fp16, torch.randn(args.images, 3, args.size, args.size))
    print(f"\nparity on {args.images} random images: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))

    print("\n| engine | batch | median ms | images/s | fp16 ms / this |\n|---|---|---|---|---|")
    for batch in BATCHES:
        ms = {"int8 (repq_fx, target tensorrt)": int8.latency_ms(batch, args.size, args.warmup, args.runs),
              "fp16 (merged float model)": fp16.latency_ms(batch, args.size, args.warmup, args.runs)}
        baseline = ms["fp16 (merged float model)"]
        for name, value in ms.items():
            print(f"| {name} | {batch} | {value:.3f} | {batch / value * 1000:.0f} | {baseline / value:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
