"""Lower bounds for the RepQ training step of timm ``repvgg_a0``: what is left when all
overhead is gone.

Times forward + backward of every block of the model, on the block inputs of a real 64x64 batch
of 16, in four forms:

- ``float block``: the timm block itself in train mode (3x3 conv + BN, 1x1 conv + BN, identity BN,
  add, ReLU): what the float step spends on its blocks;
- ``merged conv``: ``relu(conv3x3(x, W))`` only: the data side of RepQ-BNEst / running (one conv
  per block; the weight function, fake quant and estimates come on top);
- ``RepQ-BN data side``: the 3x3 statistics conv + its channel moments, then the merged conv:
  what RepQ-BN cannot avoid (statistics are exact batch statistics, gradients flow through
  them; the 1x1 branch and the identity, which ``block_statistics`` takes from the input
  covariance, are left out, so this is a floor);
- ``one weight pass``: one elementwise read-and-write pass over all merged kernels (7M floats):
  the unit in which the weight side of RepQ costs (LSQ forward + backward is ~12 such passes,
  BN-scaling the branch kernels ~4, the estimates ~4).

Each form is timed with the CPU time of the thread (``--threads 1``, the default; robust on a
shared box) or the wall clock (``--threads 2``), minimum of ``--repeats``.

    .venv/bin/python benchmarks/qat_step_floor.py
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    import timm

    from repq_fx.quant.bn_stats import channel_moments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", pretrained=False).train()
    blocks: list[tuple[torch.Tensor, torch.nn.Module]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: blocks.append((i[0].detach(), m)))
             for m in model.modules() if type(m).__name__ in ("RepVggBlock", "MobileOneBlock")]
    model(torch.randn(16, 3, 64, 64))
    for h in hooks:
        h.remove()

    def float_block(x: torch.Tensor, block: torch.nn.Module) -> None:
        block(x.requires_grad_()).sum().backward()

    def merged_conv(x: torch.Tensor, block: torch.nn.Module) -> None:
        conv = block.conv_kxk.conv
        F.relu(F.conv2d(x.requires_grad_(), conv.weight, None, conv.stride, 1)).sum().backward()

    def repq_bn_data(x: torch.Tensor, block: torch.nn.Module) -> None:
        conv = block.conv_kxk.conv
        x = x.requires_grad_()
        mean, var = channel_moments(F.conv2d(x, conv.weight, None, conv.stride, 1))
        weight = conv.weight * torch.rsqrt(var + 1e-5).reshape(-1, 1, 1, 1)  # stands in for M(theta)
        (F.relu(F.conv2d(x, weight, None, conv.stride, 1)).sum() + mean.sum()).backward()

    kernels = [b.conv_kxk.conv.weight.detach().clone() for _, b in blocks]

    def weight_pass() -> None:
        for k in kernels:
            k.mul(1.5)

    def run(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            xs = [x.clone() for x, _ in blocks]
            t0 = clock()
            for x, (_, block) in zip(xs, blocks):
                fn(x, block)
            best = min(best, clock() - t0)
        return best

    results = {"float block": run(float_block), "merged conv": run(merged_conv),
               "RepQ-BN data side": run(repq_bn_data)}
    best = float("inf")
    for _ in range(args.repeats):
        t0 = clock()
        weight_pass()
        best = min(best, clock() - t0)
    results["one weight pass"] = best
    base = results["float block"]
    print(f"repvgg_a0, {len(blocks)} blocks, 16x3x64x64, {args.threads} thread(s), "
          f"{'thread CPU time' if args.threads == 1 else 'wall clock'}, min of {args.repeats}; "
          f"{sum(k.numel() for k in kernels) / 1e6:.1f}M merged-kernel elements\n")
    print("| form | ms | ratio to float blocks |\n|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {1e3 * value:.1f} | {value / base:.2f}x |")


if __name__ == "__main__":
    main()
