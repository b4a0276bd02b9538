"""Multi-path blocks vs their fused grouped form (ResNeXt's equivalence), latency on CPU.

    python benchmarks/multipath.py [--paths 32] [--width 4] [--channels 256] [--size 28] [--repeats 20]

The explicit split-transform-merge block (n paths of 1x1 -> 3x3 -> 1x1) is written the readable way;
`reparam.fuse` turns it into 1x1 -> grouped 3x3 -> 1x1.  Prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

import reparam
from reparam import stats


class Path(nn.Module):
    def __init__(self, channels: int, width: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return self.body(x)


class MultiPathBlock(nn.Module):
    def __init__(self, channels: int, width: int, paths: int):
        super().__init__()
        self.paths = nn.ModuleList(Path(channels, width, 1) for _ in range(paths))

    def forward(self, x):
        return torch.relu(sum(p(x) for p in self.paths) + x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=32)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    model = MultiPathBlock(args.channels, args.width, args.paths).eval()
    x = torch.randn(1, args.channels, args.size, args.size)
    variants = {
        "multi-path (train form)": model,
        "reparam.fuse (grouped)": reparam.fuse(model, (x,)),
        "reparam.fuse remove_residuals": reparam.fuse(model, (x,), remove_residuals=True),
    }
    latency = stats.latencies_ms(list(variants.values()), (x,), warmup=3, repeats=args.repeats)
    print(f"block: {args.paths} paths x width {args.width}, {args.channels} channels, input {args.size}x{args.size}\n")
    print("| variant | convs | adds | GMACs | latency (ms) |")
    print("|---|---:|---:|---:|---:|")
    for (label, m), ms in zip(variants.items(), latency, strict=True):
        k = stats.count_kernels(m, (x,))
        print(f"| {label} | {k['conv']} | {k['add']} | {stats.count_macs(m, (x,)) / 1e9:.3f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
