"""Inference latency of ``reparam.fuse`` against the training-time model, the hand-written deploy model and
generic peers, on timm models.

Variants (each is skipped with a reason when it does not apply or fails):

``train``        the training-time model in eval mode, eager (what you have before fusing)
``fused``        ``reparam.fuse(model, x)``, eager
``deploy``       timm's hand-written deploy path ``timm.utils.model.reparameterize_model(copy.deepcopy(model))``,
                 eager: the limit for that architecture (for ResNet it is a no-op: BNs stay unfolded)
``fx_fuse``      ``torch.fx.experimental.optimization.fuse`` on the eval model (folds a BN into the conv right
                 before it, nothing else)
``ort_train``    ONNX Runtime on the export of the training-time model (ORT folds BNs itself)
``ort_fused``    ONNX Runtime on the export of ``fused``
``ort_deploy``   ONNX Runtime on the export of ``deploy``                        (opt-in: ``--variants``)
``compile_*``    ``torch.compile`` of train / fused / deploy                    (default on CUDA only)
``fused_flat``   diagnostic (opt-in): ``fused`` with every ``call_module``/``get_attr`` target aliased to a
                 top-level name, to measure what GraphModule's nested attribute walks
                 (``getattr(getattr(self.stages, "0").blocks, "0").conv.reparam(x)``) cost

Method: every variant runs on the same input tensor.  Repetitions are interleaved: each repetition times one
forward pass of every variant, in an order rotated by one each repetition, so that load changes on a shared
machine hit all variants alike.  Reported numbers are medians; ``fused/deploy`` is the ratio of the medians and
``paired`` the median of the per-repetition ratios (the two passes of one repetition run back to back).
Every variant's output is compared with the training-time model's (the deploy model's when ``train`` is not among the
variants) before timing, as a relative L2 error; larger than ``--tolerance`` gives a warning.

Examples::

    python benchmarks/latency.py                               # CPU, batch 1, 1 thread, all models
    python benchmarks/latency.py --batch 1 64 --reps 30
    python benchmarks/latency.py --models repvgg_a0 --reps 5 --size 64        # quick
    python benchmarks/latency.py --device cuda --dtype fp16 --channels-last --batch 1 64
    python benchmarks/latency.py --json out.json --plot docs/latency_cpu_b1.png
    python benchmarks/latency.py --from-json out.json --plot docs/latency_cpu_b1.png   # re-render only
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

# model name -> family; the re-parameterizable families are the ones the fused/deploy criterion is judged on
MODELS = {
    "repvgg_a0": "RepVGG",
    "repvgg_b0": "RepVGG",
    "mobileone_s0": "MobileOne",
    "mobileone_s1": "MobileOne",
    "fastvit_t8": "FastViT",
    "fastvit_sa12": "FastViT",
    "repvit_m0_9": "RepViT",
    "repvit_m1": "RepViT",
    "repghostnet_050": "RepGhost",
    "repghostnet_100": "RepGhost",
    "resnet18": "ResNet",
    "resnet50": "ResNet",
}
REP_FAMILIES = ("RepVGG", "MobileOne", "FastViT", "RepViT", "RepGhost")
ALL_VARIANTS = ("train", "fused", "fused_flat", "deploy", "fx_fuse", "ort_train", "ort_fused", "ort_deploy",
                "compile_train", "compile_fused", "compile_deploy")
CPU_DEFAULT = ("train", "fused", "deploy", "fx_fuse", "ort_train", "ort_fused")
CUDA_DEFAULT = ("train", "fused", "deploy", "fx_fuse", "compile_train", "compile_fused", "compile_deploy")
LABELS = {
    "train": "train eager", "fused": "reparam.fuse", "deploy": "timm deploy", "fx_fuse": "fx.fuse",
    "ort_train": "ORT train", "ort_fused": "ORT fused", "ort_deploy": "ORT deploy",
    "fused_flat": "fused, flat targets", "compile_train": "compile train", "compile_fused": "compile fused", "compile_deploy": "compile deploy",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Result:
    model: str
    family: str
    batch: int
    input_size: list
    times_ms: dict = field(default_factory=dict)   # variant -> list of per-repetition ms
    skipped: dict = field(default_factory=dict)    # variant -> reason
    errors: dict = field(default_factory=dict)     # variant -> relative L2 error vs ``reference``
    reference: Optional[str] = None                # variant the errors are measured against (train if measured)
    kernels: dict = field(default_factory=dict)    # variant -> count_kernels dict
    explain: dict = field(default_factory=dict)    # fused vs deploy evidence (--explain)
    macs: dict = field(default_factory=dict)       # variant -> MACs
    fuse_s: Optional[float] = None

    def median(self, v: str) -> Optional[float]:
        t = self.times_ms.get(v)
        return statistics.median(t) if t else None

    def ratio(self, a: str, b: str) -> Optional[float]:
        ma, mb = self.median(a), self.median(b)
        return ma / mb if ma and mb else None

    def paired(self, a: str, b: str) -> Optional[float]:
        ta, tb = self.times_ms.get(a), self.times_ms.get(b)
        if not ta or not tb:
            return None
        return statistics.median(x / y for x, y in zip(ta, tb))


# ------------------------------------------------------------------------------------------------ building


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:100] if text else ''}"


def _rel_err(y: Any, ref: Any) -> float:
    y = y[0] if isinstance(y, (list, tuple)) else y
    ref = ref[0] if isinstance(ref, (list, tuple)) else ref
    y = torch.as_tensor(y).detach().to("cpu", torch.float64)
    ref = torch.as_tensor(ref).detach().to("cpu", torch.float64)
    scale = ref.norm().item()
    return (y - ref).norm().item() / scale if scale > 0 else (y - ref).norm().item()


class OrtRunner:
    """A callable running an ONNX file in ONNX Runtime on a fixed numpy input."""

    def __init__(self, path: str, threads: int, device: str):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
            providers = ["CUDAExecutionProvider"]
        self.session = ort.InferenceSession(path, opts, providers=providers)
        self.name = self.session.get_inputs()[0].name
        self.feed = None

    def bind(self, x: torch.Tensor) -> None:
        self.feed = {self.name: x.detach().to("cpu", torch.float32).contiguous().numpy()}

    def __call__(self, x=None):
        return self.session.run(None, self.feed)[0]


def _export_onnx(model: nn.Module, x: torch.Tensor, path: str) -> None:
    from reparam.export import export_onnx

    export_onnx(model, (x,), path)  # dynamic batch axis; verified in ORT against the model


def flatten_targets(gm):
    """A GraphModule computing what ``gm`` does whose module/attribute targets are all top-level names.

    Diagnostic only: it shares ``gm``'s modules and tensors; its state_dict keys are the flattened names.
    """
    import functools

    import torch.fx as fx

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    attrs: dict = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and "." in node.target:
            flat = "f_" + node.target.replace(".", "_")
            attrs[flat] = functools.reduce(getattr, node.target.split("."), gm)
            node.target = flat
        elif node.op in ("call_module", "get_attr"):
            attrs[node.target] = getattr(gm, node.target)
    return fx.GraphModule(attrs, graph, "FlatFused").eval()


def build_variants(name: str, args, x_cpu: torch.Tensor, tmpdir: str, log) -> tuple[dict, dict, Optional[float]]:
    """Return ({variant: callable taking x}, {variant: skip reason}, seconds reparam.fuse took)."""
    import timm
    from timm.utils.model import reparameterize_model

    import reparam

    wanted = args.variants
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    fns: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    fuse_s = None

    torch.manual_seed(0)
    train = timm.create_model(name, pretrained=False).eval()
    eager: dict[str, nn.Module] = {"train": train}

    if any(v in wanted for v in ("fused", "ort_fused", "compile_fused")):
        t0 = time.perf_counter()
        try:
            eager["fused"] = reparam.fuse(train, (x_cpu,))
            fuse_s = time.perf_counter() - t0
        except Exception as exc:  # keep going: the table says why
            skipped["fused"] = f"reparam.fuse failed ({_first_line(exc)})"
    if "fused_flat" in wanted and "fused" in eager:
        eager["fused_flat"] = flatten_targets(eager["fused"])
    if any(v in wanted for v in ("deploy", "ort_deploy", "compile_deploy")):
        eager["deploy"] = reparameterize_model(copy.deepcopy(train)).eval()
    if "fx_fuse" in wanted:
        from torch.fx.experimental.optimization import fuse as fx_fuse

        try:
            eager["fx_fuse"] = fx_fuse(train)  # works on a deep copy
        except Exception as exc:
            skipped["fx_fuse"] = f"fx fuse failed ({_first_line(exc)})"

    # ONNX exports happen on CPU in float32, before any dtype/device/memory-format change
    for src in ("train", "fused", "deploy"):
        v = f"ort_{src}"
        if v not in wanted:
            continue
        if src not in eager:
            skipped[v] = skipped.get(src, f"no {src} model")
            continue
        if args.dtype != "fp32":
            skipped[v] = "ONNX Runtime measured in fp32 only"
            continue
        path = os.path.join(tmpdir, f"{name}_{src}.onnx")
        try:
            log(f"  exporting {src} to ONNX ...")
            _export_onnx(eager[src], x_cpu, path)
            fns[v] = OrtRunner(path, args.threads, args.device)
        except Exception as exc:
            skipped[v] = f"export/ORT failed ({_first_line(exc)})"

    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    for key, mod in eager.items():
        mod.to(device=device, dtype=dtype)
        if args.channels_last:
            mod.to(memory_format=mf)
        if key in wanted:
            fns[key] = mod

    for src in ("train", "fused", "deploy"):
        v = f"compile_{src}"
        if v not in wanted:
            continue
        if src not in eager:
            skipped[v] = skipped.get(src, f"no {src} model")
            continue
        try:
            fns[v] = torch.compile(eager[src], mode=args.compile_mode)
        except Exception as exc:
            skipped[v] = f"torch.compile failed ({_first_line(exc)})"
    fns = {v: fns[v] for v in ALL_VARIANTS if v in fns}  # canonical order
    return fns, skipped, fuse_s


def explain(fused: nn.Module, deploy: nn.Module, x: torch.Tensor) -> dict:
    """Load-independent evidence of where ``fused`` and ``deploy`` differ on one forward pass.

    ``ops_only_fused`` / ``ops_only_deploy``: ATen ops (by name) one runs more often than the other;
    ``py_calls``, ``module_calls``, ``getattr_calls``: Python function calls, ``nn.Module.__call__`` and
    ``nn.Module.__getattr__`` calls (cProfile), the per-forward interpreter work on top of the kernels.
    """
    import cProfile
    import collections
    import pstats

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    out: dict = {}
    ops = {}
    for key, mod in (("fused", fused), ("deploy", deploy)):
        counter = Ops()
        with torch.no_grad(), counter:
            mod(x)
        ops[key] = counter.ops
        with torch.no_grad():
            prof = cProfile.Profile()
            prof.enable()
            mod(x)
            prof.disable()
        st = pstats.Stats(prof)
        calls = {f"{k[0].rsplit('/', 1)[-1]}:{k[2]}": v[1] for k, v in st.stats.items()}
        out[key] = {"py_calls": st.total_calls,
                    "module_calls": calls.get("module.py:_call_impl", 0),
                    "getattr_calls": calls.get("module.py:__getattr__", 0)}
    out["ops_only_fused"] = dict(ops["fused"] - ops["deploy"])
    out["ops_only_deploy"] = dict(ops["deploy"] - ops["fused"])
    return out


# ------------------------------------------------------------------------------------------------ timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, x: torch.Tensor, reps: int, warmup: int, device: str) -> dict:
    """Per-variant list of ``reps`` single-pass times (ms), interleaved round-robin with a rotating start."""
    names = list(fns)
    times = {n: [] for n in names}
    with torch.no_grad():
        for r in range(warmup + reps):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                fn = fns[n]
                _sync(device)
                t0 = time.perf_counter()
                fn(x)
                _sync(device)
                dt = (time.perf_counter() - t0) * 1e3
                if r >= warmup:
                    times[n].append(dt)
    return times


def measure(name: str, args, log) -> list[Result]:
    import timm

    from reparam.stats import count_kernels, count_macs

    family = MODELS.get(name, "other")
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    size = list(cfg.get("input_size", (3, 224, 224)))
    if args.size:
        size[1:] = [args.size, args.size]
    torch.manual_seed(1)
    x1 = torch.randn(1, *size)
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        fns, skipped, fuse_s = build_variants(name, args, x1, tmpdir, log)
        for b in args.batch:
            res = Result(name, family, b, size, skipped=dict(skipped), fuse_s=fuse_s)
            torch.manual_seed(2)
            x = torch.randn(b, *size).to(device=args.device, dtype=DTYPES[args.dtype])
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            live = {}
            outputs = {}
            with torch.no_grad():
                for v, fn in fns.items():
                    if isinstance(fn, OrtRunner):
                        fn.bind(x)
                    try:
                        outputs[v] = fn(x)
                    except Exception as exc:
                        res.skipped[v] = f"run failed ({_first_line(exc)})"
                        continue
                    live[v] = fn
                    if not args.no_structure and isinstance(fn, nn.Module) and v in ("train", "fused", "deploy", "fx_fuse") and b == args.batch[0]:
                        res.kernels[v] = count_kernels(fn, x)
                        res.macs[v] = count_macs(fn, x)
            # every output against the training-time model's (the deploy model's when train is not measured)
            res.reference = next((v for v in ("train", "deploy", "fused") if v in outputs), None)
            for v, y in outputs.items():
                if res.reference is not None and v != res.reference:
                    res.errors[v] = _rel_err(y, outputs[res.reference])
            del outputs
            if args.explain and b == args.batch[0] and "fused" in live and "deploy" in live:
                res.explain = explain(live["fused"], live["deploy"], x)
            for v, e in res.errors.items():
                if not e <= args.tolerance:
                    log(f"  WARNING {name} {v}: relative error {e:.2e} vs {res.reference} exceeds {args.tolerance:g}")
            log(f"  timing batch {b}: {', '.join(live)} ({args.warmup} warm-up + {args.reps} interleaved reps)")
            res.times_ms = time_interleaved(live, x, args.reps, args.warmup, args.device)
            results.append(res)
            log("  " + "  ".join(f"{v}={res.median(v):.2f}" for v in live))
    return results


# ------------------------------------------------------------------------------------------------ reporting


def _fmt(v: Optional[float], spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def geomean(values: list) -> Optional[float]:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def markdown_tables(results: list[Result], variants: list, tol: float = 1e-3) -> str:
    out = []
    batches = sorted({r.batch for r in results})
    for b in batches:
        rows = [r for r in results if r.batch == b]
        cols = [v for v in variants if any(r.times_ms.get(v) for r in rows)]
        out.append(f"\n#### Batch {b}: median latency (ms)\n")
        flat = "fused_flat" in cols
        head = ["model"] + [LABELS[v] for v in cols] + ["fused/deploy", "paired"]
        head += ["flat/fused paired"] if flat else []
        compiled = "compile_fused" in cols and "compile_deploy" in cols
        head += ["compiled fused/deploy (paired)"] if compiled else []
        head += ["train/fused"] if "train" in cols else []
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for r in rows:
            cells = [r.model] + [_fmt(r.median(v)) for v in cols]
            cells += [_fmt(r.ratio("fused", "deploy"), ".3f"), _fmt(r.paired("fused", "deploy"), ".3f")]
            if flat:
                cells.append(_fmt(r.paired("fused_flat", "fused"), ".3f"))
            if compiled:
                cells.append(f"{_fmt(r.ratio('compile_fused', 'compile_deploy'), '.3f')} "
                             f"({_fmt(r.paired('compile_fused', 'compile_deploy'), '.3f')})")
            if "train" in cols:
                speedup = r.ratio("train", "fused")
                cells.append(_fmt(speedup, ".2f") + ("×" if speedup else ""))
            out.append("| " + " | ".join(cells) + " |")
        rep = [r for r in rows if r.family in REP_FAMILIES]
        g = geomean([r.ratio("fused", "deploy") for r in rep])
        gp = geomean([r.paired("fused", "deploy") for r in rep])
        worst = max(rep, key=lambda r: r.ratio("fused", "deploy") or 0, default=None)
        worst_p = max(rep, key=lambda r: r.paired("fused", "deploy") or 0, default=None)
        if g is not None and worst is not None:
            out.append(f"\nfused/deploy over {', '.join(REP_FAMILIES)} at batch {b}: geometric mean "
                       f"{g:.3f} (paired {gp:.3f}); worst {worst.ratio('fused', 'deploy'):.3f} ({worst.model}), "
                       f"worst paired {worst_p.paired('fused', 'deploy'):.3f} ({worst_p.model}).")
        gf = geomean([r.paired("fused_flat", "fused") for r in rep])
        if gf is not None:
            out.append(f"fused with flat call targets vs fused (paired), geometric mean: {gf:.3f}.")
    skips = {(r.model, v): why for r in results for v, why in r.skipped.items() if v in variants}
    if skips:
        out.append("\nSkipped: " + "; ".join(f"{m} {LABELS[v]}: {why}" for (m, v), why in sorted(skips.items())))
    bad = [(r.model, r.batch, v, e) for r in results for v, e in r.errors.items() if not e <= tol]
    if bad:
        out.append(f"\nOutput mismatches (rel. L2 > {tol:g} vs train, or vs deploy when train is not measured): "
                   + "; ".join(f"{m} b{b} {v}: {e:.1e}" for m, b, v, e in bad))
    struct = [r for r in results if r.kernels]
    if struct:
        out.append("\n#### What runs (ATen ops per forward pass, from `reparam.stats.count_kernels`)\n")
        out.append("| model | convs train / fused / deploy / fx.fuse | BNs train / fused / deploy / fx.fuse "
                   "| adds fused / deploy | ops fused / deploy | GMACs fused / deploy | reparam.fuse (s) "
                   "| max rel. err fused |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        seen = set()
        for r in struct:
            if r.model in seen:
                continue
            seen.add(r.model)
            k = r.kernels

            def trio(key, vs=("train", "fused", "deploy", "fx_fuse")):
                return " / ".join(str(k[v][key]) if v in k else "–" for v in vs)

            macs = " / ".join(f"{r.macs[v] / 1e9:.3f}" if v in r.macs else "–" for v in ("fused", "deploy"))
            out.append(f"| {r.model} | {trio('conv')} | {trio('batch_norm')} | {trio('add', ('fused', 'deploy'))} "
                       f"| {trio('total', ('fused', 'deploy'))} | {macs} | {_fmt(r.fuse_s, '.1f')} "
                       f"| {_fmt(r.errors.get('fused'), '.1e')} |")
    expl = [r for r in results if r.explain]
    if expl:
        out.append("\n#### fused vs deploy: what differs per forward pass (`--explain`)\n")
        out.append("| model | ATen ops only in fused | ATen ops only in deploy | Python calls fused / deploy "
                   "| Module calls fused / deploy | `Module.__getattr__` fused / deploy |")
        out.append("|---|---|---|---:|---:|---:|")
        for r in expl:
            e = r.explain
            ops = lambda d: ", ".join(f"{k}×{v}" for k, v in sorted(d.items())) or "none"
            pair = lambda k: f"{e['fused'][k]} / {e['deploy'][k]}"
            out.append(f"| {r.model} | {ops(e['ops_only_fused'])} | {ops(e['ops_only_deploy'])} | {pair('py_calls')} "
                       f"| {pair('module_calls')} | {pair('getattr_calls')} |")
    return "\n".join(out)


def print_rich(results: list[Result], variants: list) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for b in sorted({r.batch for r in results}):
        rows = [r for r in results if r.batch == b]
        cols = [v for v in variants if any(r.times_ms.get(v) for r in rows)]
        table = Table(title=f"batch {b}: median ms")
        table.add_column("model")
        for v in cols + ["fused/deploy", "paired"]:
            table.add_column(LABELS.get(v, v), justify="right")
        for r in rows:
            ratio = r.ratio("fused", "deploy")
            style = "red" if ratio and ratio > 1.10 else ("yellow" if ratio and ratio > 1.03 else "")
            table.add_row(r.model, *[_fmt(r.median(v)) for v in cols], f"[{style}]{_fmt(ratio, '.3f')}[/]" if style
                          else _fmt(ratio, ".3f"), _fmt(r.paired("fused", "deploy"), ".3f"))
        console.print(table)


def plot(results: list[Result], variants: list, path: str, title: str) -> None:
    """Bar chart of median latency per model and variant (one panel per batch size), plus a panel with the
    fused/deploy ratios (median and paired) against the 1.03 / 1.10 marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in results})
    with_ratio = any(r.ratio("fused", "deploy") for r in results)
    n = len(batches) + with_ratio
    fig, axes = plt.subplots(n, 1, figsize=(13, 4.0 * n), squeeze=False)
    for ax, b in zip(axes[:, 0], batches):
        rows = [r for r in results if r.batch == b]
        cols = [v for v in variants if any(r.times_ms.get(v) for r in rows)]
        width = 0.8 / max(len(cols), 1)
        for i, v in enumerate(cols):
            xs = [j + (i - (len(cols) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [r.median(v) or 0 for r in rows], width, label=LABELS[v])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r.model for r in rows], rotation=20, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("median latency (ms, log)")
        ax.set_title(f"{title}, batch {b}")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    if with_ratio:
        ax = axes[-1, 0]
        models = list(dict.fromkeys(r.model for r in results))
        for k, b in enumerate(batches):
            rows = {r.model: r for r in results if r.batch == b}
            xs = [j + (k - (len(batches) - 1) / 2) * 0.3 for j in range(len(models))]
            ax.plot(xs, [rows[m].ratio("fused", "deploy") if m in rows else None for m in models], "o",
                    label=f"median ratio, batch {b}")
            ax.plot(xs, [rows[m].paired("fused", "deploy") if m in rows else None for m in models], "x",
                    label=f"paired ratio, batch {b}")
        for y, style in ((1.0, "-"), (1.03, "--"), (1.10, ":")):
            ax.axhline(y, color="grey", linestyle=style, linewidth=1)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=20, ha="right")
        ax.set_ylabel("fused / deploy")
        ax.set_title("reparam.fuse vs hand-written deploy (lower is faster; lines at 1.00, 1.03, 1.10)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def environment(args) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": args.device,
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        "reps": args.reps,
        "warmup": args.warmup,
    }
    try:
        import onnxruntime
        import timm

        env["timm"] = timm.__version__
        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names (default: all %d)" % len(MODELS))
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes (default 1; add 64 for the large batch)")
    p.add_argument("--reps", type=int, default=20, help="interleaved timed repetitions (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed interleaved repetitions first (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of %s (default: %s on CPU, %s on CUDA)"
                   % (",".join(ALL_VARIANTS), ",".join(CPU_DEFAULT), ",".join(CUDA_DEFAULT)))
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--size", type=int, default=None, help="override the input resolution (quick runs)")
    p.add_argument("--explain", action="store_true",
                   help="also compare fused and deploy op by op and count Python calls (load-independent)")
    p.add_argument("--no-structure", action="store_true", help="skip the kernel/MAC count table")
    p.add_argument("--tolerance", type=float, default=None,
                   help="warn when a variant's output differs more than this from train's (1e-3 fp32, 3e-2 fp16/bf16)")
    p.add_argument("--format", default="markdown", choices=["markdown", "rich"])
    p.add_argument("--json", default=None, help="write raw per-repetition times and the environment here")
    p.add_argument("--plot", default=None, help="write a bar chart (PNG; needs matplotlib)")
    p.add_argument("--title", default=None, help="plot title")
    p.add_argument("--from-json", default=None, help="re-render tables/plot from a --json file; measure nothing")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = list(CUDA_DEFAULT if args.device == "cuda" else CPU_DEFAULT)
    else:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = set(args.variants) - set(ALL_VARIANTS)
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(ALL_VARIANTS)}")
    if args.tolerance is None:
        args.tolerance = 1e-3 if args.dtype == "fp32" else 3e-2
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cpu" and args.dtype != "fp32":
        warnings.warn("half precision on CPU is slow and not what deployment uses; measuring anyway")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        results = [Result(**r) for r in data["results"]]
        env = data["environment"]
        variants = data.get("variants", list(ALL_VARIANTS))
    else:
        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore", category=UserWarning)
        env = environment(args)
        log(f"torch {env['torch']}, {args.threads} thread(s), device {args.device} {args.dtype}"
            f"{' channels_last' if args.channels_last else ''}, load average {env['loadavg']}")
        results = []
        for name in args.models:
            log(f"{name}:")
            results.extend(measure(name, args, log))
        variants = args.variants
        env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps({"environment": env, "variants": variants,
                                               "results": [asdict(r) for r in results]}, indent=1))
    if args.format == "rich":
        print_rich(results, variants)
    tol = args.tolerance if not args.from_json else (1e-3 if env.get("dtype", "fp32") == "fp32" else 3e-2)
    print(markdown_tables(results, variants, tol))
    if args.plot:
        title = args.title or (f"{env.get('device', 'cpu')} {env.get('dtype', 'fp32')}, {env.get('threads')} thread(s)"
                               f"{', channels_last' if env.get('channels_last') else ''}")
        plot(results, variants, args.plot, title)
        log(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
