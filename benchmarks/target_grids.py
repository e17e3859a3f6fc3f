"""Which integer grids does a deployment target change? Every quantizer of a prepared model, per target.

Prepares the same network (``repq_fx.app.train.build_model``, as ``repq-fx train`` and
``benchmarks/accuracy.py`` do) once per target and bit width, and lists each quantizer whose
``(bits, quant_min, quant_max)`` differs between the targets. Two targets with no difference train
exactly the same model (same seed, same data): one accuracy run stands for both.

    .venv/bin/python benchmarks/target_grids.py --bits W8A8 W4A4
    .venv/bin/python benchmarks/target_grids.py --targets onnxruntime-u8u8 onnxruntime-vnni
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from repq_fx.targets import TARGETS
from repq_fx.app.train import TrainConfig, build_model, parse_bits


def grids(model: str, bits: tuple[int, int], target: str, method: str = "repq-bnest") -> dict[str, tuple[int, int, int]]:
    """``{quantizer path: (bits, quant_min, quant_max)}`` of ``model`` prepared for ``target``."""
    qmodel = build_model(TrainConfig(model=model, method=method, bits=bits, target=target))
    return {name: (int(m.bits), int(m.quant_min), int(m.quant_max)) for name, m in qmodel.named_modules()
            if hasattr(m, "quant_min") and hasattr(m, "quant_max") and hasattr(m, "bits")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="examples:RepVGGNet")
    parser.add_argument("--bits", nargs="+", default=["W8A8", "W4A4"])
    parser.add_argument("--targets", nargs=2, default=["onnxruntime", "onnxruntime-u8u8"], choices=list(TARGETS),
                        metavar="TARGET", help="the two targets to compare (default: onnxruntime onnxruntime-u8u8)")
    args = parser.parse_args(argv)
    a, b = args.targets
    for text in args.bits:
        bits = parse_bits(text)
        ga, gb = grids(args.model, bits, a), grids(args.model, bits, b)
        differ = [name for name in ga if ga[name] != gb.get(name)] + [name for name in gb if name not in ga]
        verdict = "identical grids" if not differ else f"{len(differ)} differ"
        print(f"{args.model} W{bits[0]}A{bits[1]}: {len(ga)} quantizers, {a} vs {b}: {verdict}")
        for name in differ:
            print(f"    {name}: {a} {ga.get(name)}, {b} {gb.get(name)}  (bits, quant_min, quant_max)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
