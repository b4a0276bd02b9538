"""How long ``reparam.fuse`` takes: per timm model, and on synthetic chains of RepVGG-style blocks of growing
depth (does the compile time grow linearly with the model?).

Each synthetic block is ``ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))`` with ``--channels`` channels (8) on a
``--hw`` x ``--hw`` input (8 x 8), so the float64 verification inside ``reparam.fuse`` is cheap and what is
measured is the compiler itself.  Linear scaling means the 400-block chain takes 16x the 25-block one; the
target is <= 24x (1.5x slack for noise and fixed costs).

Times are medians over ``--reps`` runs (default 1 for timm models, 3 for chains), after one untimed warm-up fuse
(the first fuse in a process pays one-off costs: importing timm, fx code generation caches).  Each fuse is split
into phases by wrapping reparam's functions from the outside (no change to reparam): ``trace``
(``reparam.trace.symbolic_trace``), ``shapes`` (``reparam.trace.propagate_shapes``), ``passes``
(``Collapse.run`` without what follows), ``emit`` (building the output modules, ``to_module``), ``recompile``
(``fx.GraphModule.recompile``: Python code generation), ``copy`` (the pipeline's ``copy.deepcopy`` of the model),
``verify`` (``reparam.proofs.check_fused`` and the end-to-end check) and ``other`` (the rest: float64 cast, cleanup,
cast back).  Phase times are exclusive (a phase nested in another is not counted twice).  ``--check off`` times
``reparam.fuse(..., check=False)``.

Examples::

    python benchmarks/compile_time.py                        # timm models and chains 25..1000
    python benchmarks/compile_time.py --chains 25 50 100 200 400 --no-timm
    python benchmarks/compile_time.py --models mobileone_s0 --profile 25     # cProfile hot spots
    python benchmarks/compile_time.py --json out.json --plot docs/compile_time.png
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

TIMM_MODELS = [
    "repvgg_a0",
    "repvgg_b0",
    "mobileone_s0",
    "mobileone_s1",
    "fastvit_t8",
    "fastvit_sa12",
    "repvit_m0_9",
    "repvit_m1",
    "repghostnet_050",
    "repghostnet_100",
    "resnet18",
    "resnet50",
]
CHAINS = [25, 50, 100, 200, 400, 1000]
PHASES = ("copy", "trace", "shapes", "passes", "emit", "recompile", "verify", "other")


class RepVGGStyleBlock(nn.Module):
    """``ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))``: three linear branches that fuse to one 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.dense(x) + self.one(x) + self.identity(x))


def chain(blocks: int, channels: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[RepVGGStyleBlock(channels) for _ in range(blocks)])
    with torch.no_grad():  # non-trivial statistics, kept tame so 1000 blocks stay finite
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.2, 0.4)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


# ------------------------------------------------------------------------------------------------ phases


class _CopyProxy:
    """Stands in for the ``copy`` module inside ``reparam.pipeline`` so that its deep copies can be timed."""

    def __init__(self, module, deepcopy):
        self._module = module
        self.deepcopy = deepcopy

    def __getattr__(self, name):
        return getattr(self._module, name)


class PhaseTimer:
    """Exclusive (self) time per phase, by wrapping reparam functions for the duration of a ``with`` block."""

    def __init__(self):
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._stack: list = []

    def _wrap(self, phase, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*a, **k)
            finally:
                nested = self._stack.pop()
                dt = time.perf_counter() - t0
                self.totals[phase] += dt - nested
                if self._stack:
                    self._stack[-1] += dt

        wrapper.__wrapped__ = fn
        return wrapper

    @contextlib.contextmanager
    def installed(self):
        import reparam.parts as parts
        import reparam.pipeline as pipeline
        import reparam.trace as trace

        import torch.fx as fx

        patches = [
            (trace, "symbolic_trace", "trace"),
            (trace, "trace_whole", "trace"),  # the whole-model trace (older trees: symbolic_trace only)
            (trace, "propagate_shapes", "shapes"),
            (pipeline, "check_fused", "verify"),
            (parts, "check_fused", "verify"),
            (pipeline, "_check_end_to_end", "verify"),
            (pipeline, "_float64_copy", "copy"),  # the private float64 copy (older trees: copy.deepcopy, below)
            (fx.GraphModule, "recompile", "recompile"),
        ]
        collapse = getattr(pipeline, "Collapse", None)
        if collapse is not None and hasattr(collapse, "run"):
            patches.append((collapse, "run", "passes"))
        try:
            import reparam.passes.collapse as collapse_mod

            patches.append((collapse_mod, "to_module", "emit"))
        except ImportError:
            pass
        saved = []
        for owner, name, phase in patches:
            if hasattr(owner, name):
                orig = owner.__dict__[name] if name in getattr(owner, "__dict__", {}) else getattr(owner, name)
                saved.append((owner, name, orig))
                setattr(owner, name, self._wrap(phase, orig))
        if hasattr(pipeline, "copy") and hasattr(pipeline.copy, "deepcopy"):
            saved.append((pipeline, "copy", pipeline.copy))
            pipeline.copy = _CopyProxy(pipeline.copy, self._wrap("copy", pipeline.copy.deepcopy))
        try:
            yield self
        finally:
            for owner, name, orig in reversed(saved):
                setattr(owner, name, orig)


def timed_fuse(model, inputs, check: bool, profile: int = 0):
    """(seconds, phases dict, cProfile text or None) of one ``reparam.fuse``."""
    import reparam

    timer = PhaseTimer()
    prof = cProfile.Profile() if profile else None
    with timer.installed(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        reparam.fuse(model, inputs, check=check)
        total = time.perf_counter() - t0
        if prof:
            prof.disable()
    phases = dict(timer.totals)
    phases["other"] = max(total - sum(v for k, v in phases.items() if k != "other"), 0.0)
    text = None
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(profile)
        buf2 = io.StringIO()
        pstats.Stats(prof, stream=buf2).sort_stats("tottime").print_stats(profile)
        text = _trim(buf.getvalue()) + "\n--- by own time ---\n" + _trim(buf2.getvalue())
    return total, phases, text


def _trim(report: str) -> str:
    lines = report.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    return "\n".join(
        line.replace(str(Path(torch.__file__).parent.parent) + "/", "").replace(
            str(Path(__file__).resolve().parent.parent) + "/", ""
        )
        for line in lines[start:]
        if line.strip()
    )


def measure(make, inputs, reps: int, check: bool, profile: int, log, label: str) -> dict:
    model = make()
    runs, phase_runs = [], []
    for r in range(reps):
        total, phases, text = timed_fuse(model, inputs, check, profile if r == 0 else 0)
        runs.append(total)
        phase_runs.append(phases)
        if text:
            log(f"\n--- cProfile of reparam.fuse({label}) ---\n{text}\n")
    med = statistics.median(runs)
    # phases of the run closest to the median
    closest = min(range(len(runs)), key=lambda i: abs(runs[i] - med))
    return {"seconds": med, "runs": runs, "phases": phase_runs[closest]}


# ------------------------------------------------------------------------------------------------ report


def _phase_cells(row) -> str:
    p = row["phases"]
    return " | ".join(f"{p.get(k, 0):.2f}" for k in PHASES)


def markdown(timm_rows: list, chain_rows: list, check: bool) -> str:
    out = []
    if timm_rows:
        out.append(f"\n#### `reparam.fuse` per timm model (check={check}; seconds, median)\n")
        out.append("| model | input | params (M) | fuse (s) | " + " | ".join(PHASES) + " |")
        out.append("|---|---|---:|---:|" + "---:|" * len(PHASES))
        for r in timm_rows:
            out.append(
                f"| {r['model']} | {r['input']} | {r['params'] / 1e6:.1f} | {r['seconds']:.2f} | {_phase_cells(r)} |"
            )
    if chain_rows:
        base = chain_rows[0]
        out.append(f"\n#### Synthetic chains of RepVGG-style blocks (check={check}; seconds, median)\n")
        out.append(f"| blocks | fuse (s) | ms / block | × {base['blocks']} blocks | " + " | ".join(PHASES) + " |")
        out.append("|---:|---:|---:|---:|" + "---:|" * len(PHASES))
        for r in chain_rows:
            out.append(
                f"| {r['blocks']} | {r['seconds']:.2f} | {r['seconds'] / r['blocks'] * 1e3:.1f} | "
                f"{r['seconds'] / base['seconds']:.1f} | {_phase_cells(r)} |"
            )
        by = {r["blocks"]: r["seconds"] for r in chain_rows}
        if 25 in by and 400 in by:
            ratio = by[400] / by[25]
            out.append(
                f"\n400/25 compile-time ratio: {ratio:.1f}× (linear = 16×, target ≤ 24×: "
                f"{'met' if ratio <= 24 else 'NOT met'})."
            )
    return "\n".join(out)


def plot(chain_rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["blocks"] for r in chain_rows]
    ys = [r["seconds"] for r in chain_rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    a1.loglog(xs, ys, "o-", label="reparam.fuse")
    a1.loglog(xs, [ys[0] * x / xs[0] for x in xs], "--", color="grey", label="linear from first point")
    a1.set_xlabel("RepVGG-style blocks")
    a1.set_ylabel("seconds")
    a1.set_title("compile time vs depth")
    a1.grid(which="both", alpha=0.3)
    a1.legend()
    bottom = [0.0] * len(xs)
    for phase in PHASES:
        vals = [r["phases"].get(phase, 0) / r["blocks"] * 1e3 for r in chain_rows]
        a2.bar([str(x) for x in xs], vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    a2.set_xlabel("blocks")
    a2.set_ylabel("ms per block")
    a2.set_title("per-block cost by phase")
    a2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=TIMM_MODELS, help="timm models (default: the latency set)")
    p.add_argument("--no-timm", action="store_true", help="skip the timm models")
    p.add_argument("--chains", nargs="*", type=int, default=CHAINS, help="chain depths (default %s)" % CHAINS)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--hw", type=int, default=8, help="chain input height/width (default 8)")
    p.add_argument("--reps", type=int, default=None, help="runs per model (default 1 timm, 3 chains)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--check", default="on", choices=["on", "off"], help="reparam.fuse(check=...)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile the first fuse of each model and print its top N functions",
    )
    p.add_argument(
        "--profile-over",
        type=float,
        default=None,
        metavar="S",
        help="profile (top 25) only the models whose first fuse took more than S seconds",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of the chain scaling (needs matplotlib)")
    p.add_argument("--from-json", default=None, help="re-render tables/plot from a --json file; measure nothing")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        env = data["environment"]
        print(
            f"torch {env['torch']}, {env['threads']} thread(s), chains: {env['channels']} channels, "
            f"{env['hw']}x{env['hw']} input"
        )
        print(markdown(data["timm"], data["chains"], env["check"]))
        if args.plot and data["chains"]:
            plot(data["chains"], args.plot)
        return 0
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.set_num_threads(args.threads)
    check = args.check == "on"
    models = [] if args.no_timm else args.models

    import reparam

    if models:
        import timm  # imported up front: its import is not part of any fuse
    # warm-up: the first fuse of a process pays one-off costs (imports inside reparam, fx caches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reparam.fuse(chain(2, 4), (torch.randn(1, 4, 4, 4),))

    timm_rows, chain_rows = [], []
    for name in models:

        def make(name=name):
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=False).eval()

        m = make()
        size = tuple(m.pretrained_cfg.get("input_size", (3, 224, 224)))
        params = sum(t.numel() for t in m.parameters())
        del m
        x = (torch.randn(1, *size),)
        log(f"{name} {size} ...")
        row = measure(make, x, args.reps or 1, check, args.profile, log, name)
        if args.profile_over is not None and not args.profile and row["seconds"] > args.profile_over:
            timed = timed_fuse(make(), x, check, 25)
            log(f"\n--- cProfile of reparam.fuse({name}), {row['seconds']:.1f} s ---\n{timed[2]}\n")
        row.update(model=name, input="x".join(map(str, size[1:])), params=params)
        timm_rows.append(row)
        log(f"  {row['seconds']:.2f} s  " + " ".join(f"{k}={v:.2f}" for k, v in row["phases"].items()))
    for n in args.chains:
        x = (torch.randn(1, args.channels, args.hw, args.hw),)
        log(f"chain of {n} blocks ...")
        row = measure(lambda n=n: chain(n, args.channels), x, args.reps or 3, check, args.profile, log, f"chain {n}")
        row.update(blocks=n)
        chain_rows.append(row)
        log(f"  {row['seconds']:.2f} s  " + " ".join(f"{k}={v:.2f}" for k, v in row["phases"].items()))

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), chains: {args.channels} channels, "
        f"{args.hw}x{args.hw} input"
    )
    print(markdown(timm_rows, chain_rows, check))
    if args.json:
        env = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "check": check,
            "channels": args.channels,
            "hw": args.hw,
        }
        Path(args.json).write_text(json.dumps({"environment": env, "timm": timm_rows, "chains": chain_rows}, indent=1))
    if args.plot and chain_rows:
        plot(chain_rows, args.plot)
        log(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
