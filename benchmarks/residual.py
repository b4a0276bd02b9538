"""Residual removal cost and speed: torchvision ResNets, original vs fused vs plain (no residual adds).

    python benchmarks/residual.py [--models resnet18,resnet34,resnet50] [--size 224] [--repeats 20] [--threads N]

Prints a markdown table: params, MACs, convs/adds executed and median latency (interleaved, batch 1,
eager CPU) for the original model, `reparam.fuse` and `reparam.fuse(remove_residuals=True)`.
"""

from __future__ import annotations

import argparse

import torch

import reparam
from reparam import stats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet34,resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchvision

    x = torch.randn(1, 3, args.size, args.size)
    print("| model | variant | params (M) | GMACs | convs | adds | latency (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        model = getattr(torchvision.models, name)().eval()
        variants = {
            "original": model,
            "fused": reparam.fuse(model, (x,)),
            "plain (remove_residuals)": reparam.fuse(model, (x,), remove_residuals=True),
        }
        latency = stats.latencies_ms(list(variants.values()), (x,), warmup=3, repeats=args.repeats)
        for (label, m), ms in zip(variants.items(), latency, strict=True):
            k = stats.count_kernels(m, (x,))
            print(
                f"| {name} | {label} | {stats.count_params(m) / 1e6:.2f} | {stats.count_macs(m, (x,)) / 1e9:.2f} "
                f"| {k['conv']} | {k['add']} | {ms:.2f} |"
            )


if __name__ == "__main__":
    main()
