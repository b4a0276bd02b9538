"""cost="macs" vs cost="latency" on blocks with concatenated branches, measured on this machine.

    python benchmarks/cost_decisions.py [--cases 8x12 64x56 ...] [--threads 1] [--rounds 30] [--device cpu]

Each case is an Inception-style ``cat([conv3x3(x), conv1x1(x), conv1x3(x)])`` block (C channels in and per branch,
H x W input, batch 1).  One 3x3 conv with all outputs costs more MACs than the three convs, so ``cost="macs"`` keeps
three; ``cost="latency"`` times both forms and keeps the faster.  The script fuses each block both ways (latency with
a fresh cache, so it measures), then times the original, both fused models and the forced single kernel side by side
(interleaved rounds, A B C D / D C B A ..., each sample the fastest of 5 runs; medians, and medians of the rounds'
ratios, which load on the machine hits alike) and prints a markdown table: what each cost model chose, the
times, and whether latency picked the single kernel where it is faster and was no slower than macs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings

import torch
import torch.nn as nn

import reparam
from reparam import cost as C
from reparam import stats
from reparam.latency_cache import LatencyCache
from reparam.models.blocks import InceptionConcat

TIE = C.NOISE  # times within this fraction of each other are a tie


class AlwaysMerge:
    """A cost model that merges everything: the single-kernel form, for comparison."""

    def decide(self, candidate: C.Candidate) -> C.Decision:
        return C.Decision(True, "forced")


def convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def run_case(channels: int, size: int, rounds: int, device: str) -> dict:
    torch.manual_seed(0)
    model = InceptionConcat(channels).eval().to(device)
    x = torch.randn(1, channels, size, size, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_macs = reparam.fuse(model, (x,), cost="macs")
        with tempfile.TemporaryDirectory() as cache_dir:  # a fresh cache: latency measures
            latency = C.LatencyCost(device, torch.float32, LatencyCache(os.path.join(cache_dir, "latency.json")))
            by_latency, report = reparam.fuse_with_report(model, (x,), cost=latency)
        single = reparam.fuse(model, (x,), cost=AlwaysMerge())
    models = [model, by_macs, by_latency, single]
    # each sample the fastest of 5 back-to-back runs: other work on a shared machine only ever adds time
    times = stats.interleaved_times_ms(models, (x,), warmup=5, rounds=rounds, passes=5, alternate=True, best=True)
    original, macs_ms, latency_ms, single_ms = (statistics.median(t) for t in times)
    decision = report.decisions[0] if report.decisions else None
    single_ratio, latency_ratio = paired_ratio(times[3], times[0]), paired_ratio(times[2], times[1])
    picked_single = convs(by_latency) == 1
    return {
        "case": f"{channels} ch / {size}x{size}",
        "macs_convs": convs(by_macs),
        "latency_convs": convs(by_latency),
        "original_ms": original,
        "macs_ms": macs_ms,
        "latency_ms": latency_ms,
        "single_ms": single_ms,
        "measured": decision and (decision.before_s * 1e3, decision.after_s * 1e3),
        # latency picks the single kernel where it is clearly faster, and keeps three where it is clearly slower
        "single_ratio": single_ratio,
        "latency_ratio": latency_ratio,
        "picks_right": picked_single if single_ratio < 1 - TIE else not picked_single or single_ratio <= 1 + TIE,
        # the same kernels as macs chose are not slower, whatever the clock says
        "not_slower": convs(by_latency) == convs(by_macs) or latency_ratio <= 1 + TIE,
    }


def paired_ratio(a: list, b: list) -> float:
    """Median over the rounds of ``a / b``: each round's samples are neighbours in time, so load that slows both
    cancels out."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def parse_case(text: str) -> tuple[int, int]:
    channels, size = text.lower().split("x")
    return int(channels), int(size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        type=parse_case,
        default=[(8, 12), (64, 56)],
        metavar="CxS",
        help="channels x spatial size, e.g. 8x12 64x56 (default)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per case")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, {args.threads} thread(s), batch 1, {args.rounds} interleaved rounds (medians)\n")
    print(
        "| block | macs: convs | latency: convs | latency measured (3 convs -> 1) | original | macs | latency "
        "| single kernel | single / original | latency / macs | latency picks right | latency <= macs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for channels, size in args.cases:
        r = run_case(channels, size, args.rounds, args.device)
        measured = "not timed" if not r["measured"] else f"{r['measured'][0]:.3g} -> {r['measured'][1]:.3g} ms"
        print(
            f"| {r['case']} | {r['macs_convs']} | {r['latency_convs']} | {measured} | {r['original_ms']:.3g} ms "
            f"| {r['macs_ms']:.3g} ms | {r['latency_ms']:.3g} ms | {r['single_ms']:.3g} ms "
            f"| {r['single_ratio']:.2f} | {r['latency_ratio']:.2f} "
            f"| {'yes' if r['picks_right'] else 'NO'} | {'yes' if r['not_slower'] else 'NO'} |"
        )
        ok = ok and r["picks_right"] and r["not_slower"]
    print(f"\nties: within {TIE:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
