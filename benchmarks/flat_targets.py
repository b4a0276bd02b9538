"""Eager latency of fused timm models with nested vs flat call targets (reparam.flatten), against timm's deploy form.

    OMP_NUM_THREADS=1 python benchmarks/flat_targets.py [--models repvgg_a0 mobileone_s0 fastvit_t8] [--rounds 60]

One thread, batch 1, the three forms timed interleaved (round robin, order alternating), median of the rounds.
``nested`` is the same fused model with flattening switched off (its code walks ``self.stages[0].blocks[0]...``),
``flat`` what ``reparam.fuse`` returns, ``deploy`` timm's hand-written ``reparameterize_model``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from unittest import mock

import torch

import reparam
from reparam import pipeline
from reparam.stats import interleaved_times_ms

DEFAULT_MODELS = ("repvgg_a0", "mobileone_s0", "fastvit_t8")


def forms(name: str) -> tuple:
    import timm
    from timm.utils.model import reparameterize_model

    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *model.default_cfg["input_size"])
    flat = reparam.fuse(model, (x,))
    with mock.patch.object(pipeline, "flatten_all", lambda modules: None):
        nested = reparam.fuse(model, (x,))
    deploy = reparameterize_model(copy.deepcopy(model))
    return x, {"nested": nested, "flat": flat, "deploy": deploy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{'model':<14} {'nested ms':>10} {'flat ms':>9} {'deploy ms':>10} {'flat/nested':>12} "
        f"{'nested/deploy':>14} {'flat/deploy':>12}"
    )
    for name in args.models:
        x, models = forms(name)
        times = interleaved_times_ms(list(models.values()), (x,), warmup=5, rounds=args.rounds, alternate=True)
        nested, flat, deploy = (statistics.median(t) for t in times)
        print(
            f"{name:<14} {nested:>10.2f} {flat:>9.2f} {deploy:>10.2f} {flat / nested:>12.3f} "
            f"{nested / deploy:>14.3f} {flat / deploy:>12.3f}"
        )


if __name__ == "__main__":
    main()
