"""How long ``reparam.fuse`` takes on a broad, deterministic sample of timm models at their default input, on one
core: the distribution (median, 90th percentile, maximum, share within 1 s, count over 5 s) and a phase breakdown.

The sample is every ``--every``-th name of ``sorted(timm.list_models())`` with at most ``--max-params``
parameters (counted on a meta-device build: no weights are allocated), plus the re-parameterizable families and
a few reference models (:data:`FAMILIES`, :data:`EXTRA`; the families filtered by the same parameter limit; the
extra models always, marked ``*`` when they are above it and then left out of the distribution).

Each model is built with random weights (``pretrained=False``, seed 0) in eval mode, its BatchNorm statistics and
affine parameters randomised (seed 1, so folding them is not the identity), and fused once as
``reparam.fuse(model, x)`` with ``x = torch.randn(1, *pretrained_cfg["input_size"])``: the user's input, verified
as given.  One untimed warm-up fuse of a tiny model comes first (one-off imports and fx caches are not a model's
cost).  Times are wall-clock seconds with ``torch.set_num_threads(1)``; run with ``OMP_NUM_THREADS=1``.

Phases (exclusive self-times, by wrapping reparam's functions from the outside, see ``compile_time.PhaseTimer``):
``copy`` ``trace`` ``shapes`` ``passes`` ``emit`` ``recompile`` ``verify`` (float64 runs of the fused model and
the reference, comparisons), ``record`` (the eager float64 run that records a part-by-part model's calls),
``proof`` (region-by-region proofs), ``noise`` (runs of the differently rounded twin), ``cast`` (to float64 and
back) and ``other``.

Before/after, interleaved: ``--against DIR`` times each model in two worker processes, one importing reparam
from ``DIR`` (e.g. ``git archive`` of an older commit unpacked there) and one from this checkout, alternating
which goes first, so load changes on a shared machine hit both alike.

Examples::

    OMP_NUM_THREADS=1 python benchmarks/fuse_time.py                       # the default sample
    OMP_NUM_THREADS=1 python benchmarks/fuse_time.py --every 10 --json ft.json
    OMP_NUM_THREADS=1 python benchmarks/fuse_time.py --models maxvit_tiny_tf_384 fastvit_t8 --profile 30
    OMP_NUM_THREADS=1 python benchmarks/fuse_time.py --against /tmp/base --limit 40
    python benchmarks/fuse_time.py --from-json ft.json                     # re-render, measure nothing
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_time  # noqa: E402  (its PhaseTimer and cProfile helpers)
import latency  # noqa: E402  (its generated-section writer)

FAMILIES = ("repvgg*", "mobileone*", "fastvit*", "repghost*", "repvit*", "efficientvit*", "levit*", "convnext*")
EXTRA = ("maxvit_tiny_tf_384", "resnet50", "vit_base_patch16_224", "efficientnet_b0")
MAX_PARAMS = 60e6
TARGET_S, LIMIT_S = 1.0, 5.0  # the numbers: 90 % within TARGET_S, none above LIMIT_S
EXTRA_PHASES = ("record", "proof", "noise", "cast")
PHASES = compile_time.PHASES[:-1] + EXTRA_PHASES + ("other",)


# ------------------------------------------------------------------------------------------------ sample


def parameter_count(name: str) -> Optional[int]:
    """Parameters of timm's ``name`` built on the meta device (no memory, no init); None if it does not build."""
    import timm

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001  a model timm cannot build here (optional dependency): not in the sample
        return None
    return sum(t.numel() for t in model.parameters())


def sample(every: int, families: bool, max_params: float, log) -> list[tuple[str, str]]:
    """(name, group) of the sample in a fixed order: every ``every``-th timm model (group ``sample``), then the
    families (``family``), then :data:`EXTRA` (``extra``, kept whatever their size)."""
    import timm

    names = sorted(timm.list_models())
    picked = [(n, "sample") for n in (names[::every] if every else [])]
    if families:
        picked += [(n, "family") for n in names if any(fnmatch.fnmatch(n, f) for f in FAMILIES)]
    picked += [(n, "extra") for n in EXTRA]
    log(f"counting parameters of {len(picked)} candidates on the meta device ...")
    chosen, seen = [], set()
    for name, group in picked:
        if name in seen:
            continue
        seen.add(name)
        params = parameter_count(name)
        if params is not None and (params <= max_params or group == "extra"):
            chosen.append((name, group))
    return chosen


# ------------------------------------------------------------------------------------------------ one model


class FusePhases(compile_time.PhaseTimer):
    """compile_time's phases plus the float64 runs that verification adds (record / proof / noise / cast)."""

    def __init__(self):
        super().__init__()
        self.totals.update(dict.fromkeys(EXTRA_PHASES, 0.0))

    def installed(self):
        import contextlib

        import reparam.pipeline as pipeline
        import reparam.proofs as proofs
        import reparam.verify as verify

        try:
            import reparam.inside as inside
        except ImportError:  # an older tree
            inside = None
        patches = [
            (pipeline, "_apply", "passes"),  # the rule-list pipeline's one entry to every pass
            (pipeline, "record_calls", "record"),
            (inside, "record_calls", "record"),  # the runs of modules fused inside
            (pipeline, "_check_whole", "verify"),
            (pipeline, "_untouched_trace_checked", "verify"),  # the float32 check of a trace nothing was rewritten in
            (proofs, "prove", "proof"),
            (verify, "_noise_floors", "noise"),
            (pipeline, "_to_float64", "cast"),
            (pipeline, "_cast_back", "cast"),
        ]

        @contextlib.contextmanager
        def both():
            saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches if hasattr(owner, name)]
            with super(FusePhases, self).installed():
                for owner, name, phase in patches:
                    if hasattr(owner, name):
                        setattr(owner, name, self._wrap(phase, getattr(owner, name)))
                try:
                    yield self
                finally:
                    for owner, name, orig in reversed(saved):
                        setattr(owner, name, orig)

        return both()


def build(name: str):
    """(timm ``name`` in eval mode with random weights and randomised BatchNorms, its default input)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                c = m.running_var.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return model, torch.randn((1,) + size, generator=torch.Generator().manual_seed(2))


def time_one(name: str, profile: int = 0) -> dict:
    """One timed ``reparam.fuse(model, x)`` of ``name``: seconds, phases, how it was fused, or why it failed."""
    import reparam

    row = {"model": name}
    try:
        model, x = build(name)
    except Exception as exc:  # noqa: BLE001  timm cannot build it here: reported, not timed
        return dict(row, status=f"build failed ({_first_line(exc)})")
    row.update(input="x".join(map(str, x.shape[2:])), params=sum(t.numel() for t in model.parameters()))
    timer = FusePhases()
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    try:
        with timer.installed(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if prof:
                prof.enable()
            t0, c0 = time.perf_counter(), time.process_time()
            fused = reparam.fuse(model, x)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            if prof:
                prof.disable()
    except Exception as exc:  # noqa: BLE001  a refusal or a bug: the table says which, the run goes on
        return dict(row, status=f"fuse failed ({_first_line(exc)})")
    phases = dict(timer.totals)
    phases["other"] = max(seconds - sum(v for k, v in phases.items() if k != "other"), 0.0)
    report = fused.reparam_report
    parts = any("part by part" in n or "one by one" in n for n in report.notes)
    row.update(
        status="ok",
        seconds=seconds,
        cpu_s=cpu,
        phases=phases,
        path="parts" if parts else "whole",
        error=report.max_rel_error,
        rewrites=len(report.rewrites),
        checked=checked_on(report.verified_on or ""),
    )
    if prof:
        import io
        import pstats

        for order in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(profile)
            row.setdefault("profile", []).append(compile_time._trim(buf.getvalue()))
    return row


def checked_on(verified_on: str) -> str:
    """``report.verified_on`` in a table cell: ``crop 64`` (centre crops, their shortest side), ``inputs``, ``parts``
    (each fused part on what it receives), with ``bits`` before it for the float32 bit-for-bit check of a model
    nothing was rewritten in."""
    sides = re.findall(r"-> [0-9x]*?(\d+)\)", verified_on)
    where = f"crop {sides[0]}" if sides else "parts" if "each fused part" in verified_on else "inputs"
    return ("bits, " if "bit for bit" in verified_on else "") + where if verified_on else "–"


def warm_up() -> None:
    import reparam

    block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reparam.fuse(block, (torch.randn(1, 3, 8, 8),))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:100] if text else ''}"


# ------------------------------------------------------------------------------------------------ workers


def worker() -> int:
    """``--worker``: read model names from stdin, answer one JSON line per name (used by ``--against``)."""
    torch.set_num_threads(1)
    import timm  # noqa: F401  imported before any timing

    warm_up()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name:
            print(json.dumps(time_one(name)), flush=True)
    return 0


class Worker:
    """A ``--worker`` subprocess importing reparam from ``tree`` (PYTHONPATH first)."""

    def __init__(self, tree: str):
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([tree] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
            OMP_NUM_THREADS="1",
        )
        self.tree = tree
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {self.tree} exited (code {self.proc.wait()})")
        return json.loads(line)

    def time(self, name: str) -> dict:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ------------------------------------------------------------------------------------------------ report


def percentile(values: list, q: float) -> float:
    """The ``q``-quantile of ``values`` (nearest rank: the smallest value with at least ``q`` of them at or below)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def distribution(
    rows: list, max_params: float = MAX_PARAMS, groups: Optional[set] = None, key: str = "seconds"
) -> Optional[dict]:
    """Median, p90, max, share within :data:`TARGET_S` and count above :data:`LIMIT_S` of ``key`` (``seconds``:
    wall clock, ``cpu_s``: the process's CPU time) over the fused models with at most ``max_params`` parameters
    (of ``groups`` only, when given)."""
    timed = [
        r
        for r in rows
        if r.get("status") == "ok"
        and r["params"] <= max_params
        and key in r
        and (groups is None or r.get("group") in groups)
    ]
    if not timed:
        return None
    times = [r[key] for r in timed]
    slowest = max(timed, key=lambda r: r[key])
    return {
        "n": len(times),
        "median": statistics.median(times),
        "p90": percentile(times, 0.9),
        "max": max(times),
        "slowest": slowest["model"],
        "within_target": sum(t <= TARGET_S for t in times) / len(times),
        "over_limit": sum(t > LIMIT_S for t in times),
    }


def _summary(d: dict, label: str) -> str:
    met = d["within_target"] >= 0.9 and d["over_limit"] == 0
    return (
        f"{label}{d['n']} models: median {d['median']:.2f} s, "
        f"p90 {d['p90']:.2f} s, max {d['max']:.2f} s ({d['slowest']}); {100 * d['within_target']:.0f} % "
        f"within {TARGET_S:g} s, {d['over_limit']} above {LIMIT_S:g} s (target: ≥ 90 % and none: "
        f"{'met' if met else 'NOT met'})."
    )


def markdown(rows: list, against: Optional[list] = None, max_params: float = MAX_PARAMS, phases: tuple = PHASES) -> str:
    """The per-model table (with ``against``: the baseline's seconds beside; ``phases``: the phase columns) and
    the distribution line(s)."""
    out = []
    cols = ["model", "params (M)", "input", "path", "checked on"]
    cols += ["before (s)", "before CPU (s)"] if against else []
    cols += ["fuse (s)", "CPU (s)"]
    cols += [p for p in phases] + ["max rel. err"]
    out.append("| " + " | ".join(cols) + " |")
    out.append("|---|---:|---|---|---|" + "---:|" * (len(cols) - 5))
    before = {r["model"]: r for r in against or []}
    for r in rows:
        if "params" not in r:
            out.append(f"| {r['model']} | | | | | {r['status']} |")
            continue
        star = "*" if r["params"] > max_params else ""
        cells = [r["model"] + star, f"{r['params'] / 1e6:.1f}", r["input"], r.get("path", ""), r.get("checked", "")]
        if against:
            b = before.get(r["model"], {})
            ok = b.get("status") == "ok"
            cells += [
                f"{b['seconds']:.2f}" if ok else b.get("status", "–"),
                f"{b.get('cpu_s', math.nan):.2f}" if ok else "",
            ]
        if r.get("status") != "ok":
            out.append("| " + " | ".join(cells) + f" | {r['status']} |")
            continue
        cells += [f"{r['seconds']:.2f}", f"{r.get('cpu_s', math.nan):.2f}"]
        cells += [f"{r['phases'].get(p, 0.0):.2f}" for p in phases]
        cells.append(f"{r['error']:.1e}" if r.get("error") is not None else "–")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    limit = f"≤ {max_params / 1e6:g}M parameters"
    for key, clock in (("seconds", "wall clock"), ("cpu_s", "CPU time")):
        for label, groups in ((f"all {limit}", None), (f"every k-th timm model, {limit}", {"sample"})):
            for side, data in (("before", against), ("after" if against else "", rows)):
                d = distribution(data, max_params, groups, key) if data else None
                if d:
                    out.append(f"- {clock}, {side + ', ' if side else ''}{_summary(d, label + ': ')}")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        out.append(f"{len(failed)} not timed: " + "; ".join(f"{r['model']} {r['status']}" for r in failed))
    if any(r.get("params", 0) > max_params for r in rows):
        out.append(f"`*`: above {max_params / 1e6:.0f}M parameters, shown for reference, not in the distribution.")
    return "\n".join(out)


def environment() -> dict:
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "processor": latency._cpu_name(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def environment_line(env: dict) -> str:
    load, load_end = env.get("loadavg"), env.get("loadavg_end")
    loads = f"; load average {load[0]:.1f} at the start, {load_end[0]:.1f} at the end" if load and load_end else ""
    return (
        f"Measured on {env.get('processor') or env.get('platform')} ({env.get('platform')}, {env.get('cpus')} "
        f"logical CPUs), 1 thread (OMP_NUM_THREADS={env.get('omp_num_threads')}), one fuse per model and side; "
        f"Python {env.get('python')}, torch {env.get('torch')}, timm {env.get('timm')}{loads}."
    )


def write_out(path: str, env: dict, rows: list, against: Optional[list], section: str = "fuse-time") -> None:
    """The generated ``section`` of the Markdown file ``path`` (see ``latency.write_section``)."""
    tables = markdown(rows, against, env.get("max_params", MAX_PARAMS), phases=("copy", "trace", "shapes", "verify"))
    latency.write_section(
        path,
        section,
        env.get("command", "python benchmarks/fuse_time.py"),
        environment_line(env),
        "\n" + tables,
        script="fuse_time.py",
    )


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=None, help="these timm models instead of the sample")
    p.add_argument("--every", type=int, default=20, help="every k-th name of timm.list_models() (default 20)")
    p.add_argument("--no-families", action="store_true", help="leave the re-parameterizable families out")
    p.add_argument("--max-params", type=float, default=MAX_PARAMS, help="parameter limit (default 60e6)")
    p.add_argument("--limit", type=int, default=None, help="at most this many models (the first of the sample)")
    p.add_argument(
        "--against", default=None, metavar="DIR", help="also time reparam imported from DIR, interleaved (before/after)"
    )
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N cProfile entries per model")
    p.add_argument("--json", default=None, help="write rows and the environment here")
    p.add_argument(
        "--out",
        default=None,
        metavar="MD",
        help="also write the distribution and a compact table (phases copy, trace, shapes, verify) into "
        "this Markdown file's generated section (--section)",
    )
    p.add_argument("--section", default="fuse-time", help="the generated section --out writes (default fuse-time)")
    p.add_argument("--from-json", default=None, help="re-render the tables from a --json file; measure nothing")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker()
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        env, rows, against = data["environment"], data["rows"], data.get("against")
        print(markdown(rows, against, env.get("max_params", MAX_PARAMS)))
        if args.out:
            write_out(args.out, env, rows, against, args.section)
        return 0
    torch.set_num_threads(1)
    env = environment()
    env["max_params"] = args.max_params
    if args.models:
        names = [(n, "given") for n in args.models]
    else:
        names = sample(args.every, not args.no_families, args.max_params, log)
    names = names[: args.limit] if args.limit else names
    log(f"{len(names)} models; torch {env['torch']}, timm {env['timm']}, 1 thread, load {env['loadavg']}")
    rows, against = [], []
    if args.against:
        workers = {"before": Worker(args.against), "after": Worker(str(Path(__file__).resolve().parent.parent))}
        try:
            for i, (name, group) in enumerate(names):
                order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
                got = {side: dict(workers[side].time(name), group=group) for side in order}
                against.append(got["before"])
                rows.append(got["after"])
                log(
                    f"{name}: before {got['before'].get('seconds', got['before']['status'])}, "
                    f"after {got['after'].get('seconds', got['after']['status'])}"
                )
        finally:
            for w in workers.values():
                w.close()
    else:
        warm_up()
        for name, group in names:
            row = dict(time_one(name, args.profile), group=group)
            rows.append(row)
            log(f"{name}: {row.get('seconds', row['status'])}")
            for text in row.pop("profile", []):
                log(f"\n--- cProfile of reparam.fuse({name}) ---\n{text}\n")
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    env["command"] = latency.command_line(argv, "fuse_time.py")
    print(markdown(rows, against or None, args.max_params))
    if args.out:
        write_out(args.out, env, rows, against or None, args.section)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows, "against": against or None}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
