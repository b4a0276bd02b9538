"""Third-party coverage: does ``reparam.fuse`` work, exactly, on timm's and torchvision's models?

For each model (random weights, non-trivial BatchNorm statistics, ``pretrained=False``) this measures

* exactness: the fused float32 model against the float32 original (relative L2 error, bound 1e-5) and the
  fused float64 model against the float64 original (bound 1e-9);
* executed kernels (:func:`reparam.stats.count_kernels`): convolutions / batch norms before and after, and
  after timm's own deploy path (``timm.utils.model.reparameterize_model``) for timm models;
* fuse time (wall clock and process CPU time, one thread) and whether the input model was left untouched.

The timm models swept are enumerated, not listed: every timm model module that defines a module class with
a ``fuse`` / ``reparameterize`` / ``switch_to_deploy`` method (RepVGG/MobileOne in byobnet, FastViT, RepGhost,
RepViT, GhostNet, LeViT, ...), plus the classic torchvision classification nets.

    python benchmarks/coverage.py                       # representative slice, markdown table on stdout
    python benchmarks/coverage.py --all --out docs/coverage.md --jobs 2
    python benchmarks/coverage.py repvgg_a0 tv:resnet18  # named models (tv: = torchvision)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import platform
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import reparam  # noqa: E402
from reparam.stats import count_kernels, relative_error  # noqa: E402

FP32_TOL = 1e-5
FP64_TOL = 1e-9
DEPLOY_METHODS = ("fuse", "reparameterize", "switch_to_deploy")
SIZES = (64, 96, 128, 160, 224, 256)  # smallest accepted input side first

# one or two per family: what CI and the default run cover
SLICE_TIMM = [
    "repvgg_a0",
    "repvgg_b1g4",
    "mobileone_s0",
    "mobileone_s4",
    "gernet_s",
    "resnet51q",
    "fastvit_t8",
    "fastvit_sa12",
    "fastvit_mci0",
    "repghostnet_050",
    "repvit_m0_9",
    "ghostnet_050",
    "ghostnetv2_100",
    "ghostnetv3_050",
    "levit_128s",
    "levit_conv_128s",
    "efficientvit_m0",
    "shvit_s1",
    "tiny_vit_5m_224",
    "lcnetv2_small",
    "nextvit_small",
    "efficientvim_m1",
    "iformer_t",
]
SLICE_TV = [
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "vgg11_bn",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
    "googlenet",
    "inception_v3",
    "mnasnet0_5",
    "densenet121",
    "squeezenet1_1",
    "alexnet",
]


def all_torchvision() -> list:
    """Every torchvision classification net (``torchvision.models.list_models``), the slice first."""
    import torchvision

    listed = torchvision.models.list_models(module=torchvision.models)
    return SLICE_TV + [n for n in listed if n not in SLICE_TV]


# compiler limitations the sweep finds (reported to passes/collapse.py): fnmatch pattern -> reason.
# tests/test_thirdparty.py marks these models xfail (not strict, so a fix shows up as XPASS).
KNOWN_ISSUES: dict = {}  # none open (fixed: ghostnetv3's cheap branches, see collapse._common_root)


def known_issue(name: str) -> Optional[str]:
    import fnmatch

    return next((why for pattern, why in KNOWN_ISSUES.items() if fnmatch.fnmatch(name, pattern)), None)


# ----------------------------------------------------------------------------------------------- models


def timm_families() -> dict:
    """timm model module -> [model names], for every module defining a block with a deploy method."""
    import timm
    from timm.models import _registry

    by_module: dict = {}
    for name in timm.list_models():
        by_module.setdefault(_registry._model_to_module.get(name, ""), []).append(name)
    found = {}
    for module_name, names in sorted(by_module.items()):
        try:
            module = importlib.import_module(f"timm.models.{module_name}")
        except Exception:  # noqa: BLE001  a sweep over timm's modules: one that does not import has no classes
            continue
        classes = [
            c
            for c in vars(module).values()
            if inspect.isclass(c) and issubclass(c, nn.Module) and any(hasattr(c, m) for m in DEPLOY_METHODS)
        ]
        if classes:
            found[module_name] = sorted(names)
    return found


def randomize_batchnorm_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics (in place): mean ~ N(0, 0.1), var ~ U(0.5, 2), weight ~ U(0.5, 1.5),
    bias ~ N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
                shape, dtype = bn.running_mean.shape, bn.running_mean.dtype
                bn.running_mean.copy_(0.1 * torch.randn(shape, generator=g).to(dtype))
                bn.running_var.copy_((0.5 + 1.5 * torch.rand(shape, generator=g)).to(dtype))
                if bn.affine:
                    bn.weight.copy_((0.5 + torch.rand(shape, generator=g)).to(dtype))
                    bn.bias.copy_(0.1 * torch.randn(shape, generator=g).to(dtype))
    return model


def _runs(model: nn.Module, x: torch.Tensor) -> bool:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(x)
        return True
    except Exception:  # noqa: BLE001  a probe of a third-party model: whatever it raises, it does not run on x
        return False


def _sizes_for(model: nn.Module) -> list:
    sizes = list(SIZES)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    for key in ("min_input_size", "input_size", "test_input_size"):
        if cfg.get(key):
            sizes.append(int(cfg[key][-1]))
    return sorted(set(sizes))


def build(name: str, seed: int = 0, batch: int = 2, min_size: int = 0):
    """(model in eval mode with randomized BN, input, source) for ``name`` (``tv:`` prefix = torchvision).

    The input is the smallest square one the model accepts (timm models with a fixed resolution are
    built with ``img_size`` set to it when that is smaller).
    """
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = lambda: _construct(name)  # noqa: E731
        if name.startswith("tv:"):
            sized = None
            source = "torchvision"
        else:
            import timm

            sized = lambda s: timm.create_model(name, pretrained=False, img_size=s)  # noqa: E731
            source = "timm"
        g = torch.Generator().manual_seed(seed + 1)
        try:
            base = default().eval()
        except Exception:  # noqa: BLE001  a third-party model that cannot be built at its default size: try SIZES
            base = None
        sizes = _sizes_for(base) if base is not None else list(SIZES)
        for size in sizes:
            if size < min_size:
                continue
            x = torch.randn(batch, 3, size, size, generator=g)
            if base is not None and _runs(base, x):
                return randomize_batchnorm_(base, seed), x, source
            if sized is not None:  # a model built for a fixed resolution: build it for this one
                try:
                    torch.manual_seed(seed)
                    model = sized(size).eval()
                except Exception:  # noqa: BLE001  not buildable for this resolution: try the next one
                    continue
                if _runs(model, x):
                    return randomize_batchnorm_(model, seed), x, source
    raise RuntimeError(f"{name}: no input size in {SIZES} runs")


def param_count(name: str) -> Optional[int]:
    """Parameters of ``name``, counted on the meta device (nothing allocated), or on the CPU where the model's own
    initialisation does not run on the meta device (torchvision's RegNets copy values); None if it cannot be built."""
    for device in ("meta", "cpu"):
        try:
            with torch.device(device), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = _construct(name)
            return sum(p.numel() for p in model.parameters())
        except Exception:  # noqa: BLE001  a third-party model that cannot be built has no size (the sweep skips it)
            continue
    return None


def _construct(name: str) -> torch.nn.Module:
    """timm's ``name``, or torchvision's for a ``tv:`` name (GoogLeNet and Inception-v3 without their training-only
    auxiliary heads), with random weights on the current device."""
    if name.startswith("tv:"):
        import torchvision

        kwargs: dict = {"weights": None}
        if name[3:] in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=False)
        return torchvision.models.get_model(name[3:], **kwargs)
    import timm

    return timm.create_model(name, pretrained=False)


def timm_deploy(model: nn.Module) -> Optional[nn.Module]:
    """timm's own deploy path on a copy (None if the model has none or it fails)."""
    try:
        from timm.utils.model import reparameterize_model
    except ImportError:
        return None
    if not any(hasattr(m, meth) for m in model.modules() for meth in DEPLOY_METHODS):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reparameterize_model(copy.deepcopy(model)).eval()


def fx_deploy(model: nn.Module) -> Optional[nn.Module]:
    """PyTorch's own conv/linear + BN folding (``torch.fx.experimental.optimization.fuse``) on a copy;
    None when the model does not trace."""
    try:
        from torch.fx.experimental.optimization import fuse

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fuse(copy.deepcopy(model).eval())
    except Exception:  # noqa: BLE001  torch's fuse traces the model: whatever it raises, it does not trace
        return None


def reference_deploy(model: nn.Module) -> tuple:
    """(deploy model, label): timm's deploy path where the model has one, else torch.fx's BN folding."""
    deploy = timm_deploy(model)
    if deploy is not None:
        return deploy, "timm"
    deploy = fx_deploy(model)
    return (deploy, "fx") if deploy is not None else (None, "")


# ----------------------------------------------------------------------------------------------- measure


@dataclass
class Row:
    name: str
    source: str = ""
    size: int = 0
    err32: Optional[float] = None
    err64: Optional[float] = None
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    timm: Optional[dict] = None  # kernels after the reference deploy path (timm's, else torch.fx fuse)
    timm_err: Optional[float] = None
    ref: str = ""  # which reference: "timm" or "fx"
    wall_s: Optional[float] = None
    cpu_s: Optional[float] = None
    untouched: Optional[bool] = None
    notes: list = field(default_factory=list)
    error: str = ""
    skipped: str = ""

    @property
    def exact(self) -> bool:
        return (
            not self.error
            and self.err32 is not None
            and self.err32 <= FP32_TOL
            and self.err64 is not None
            and self.err64 <= FP64_TOL
            and bool(self.untouched)
        )

    def vs_timm(self) -> str:
        """'-' no reference, 'beats' fewer conv+BN than the reference deploy path, 'ties', or 'LOSES' (more convs
        or BNs)."""
        if self.timm is None or not self.after:
            return "-"
        if self.after["conv"] > self.timm["conv"] or self.after["batch_norm"] > self.timm["batch_norm"]:
            return "LOSES"
        ours = self.after["conv"] + self.after["batch_norm"]
        theirs = self.timm["conv"] + self.timm["batch_norm"]
        return "beats" if ours < theirs else "ties"


def _snapshot(model: nn.Module):
    return model.training, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, snap) -> bool:
    training, state = snap
    now = model.state_dict()
    return (
        model.training == training
        and now.keys() == state.keys()
        and all(now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in state.items())
    )


def measure(name: str, seed: int = 0, max_params: Optional[float] = None) -> Row:
    row = Row(name)
    if max_params:
        params = param_count(name)
        if params is not None and params > max_params:
            row.skipped = f"skipped: {params / 1e6:.0f}M parameters (--max-params {max_params / 1e6:.0f}M)"
            return row
    try:
        model, x, row.source = build(name, seed)
        row.size = x.shape[-1]
        snap = _snapshot(model)
        with torch.no_grad():
            y = model(x)
        start, cpu = time.perf_counter(), time.process_time()
        fused = reparam.fuse(model, (x,))
        row.wall_s, row.cpu_s = time.perf_counter() - start, time.process_time() - cpu
        row.notes = list(fused.reparam_report.notes)
        with torch.no_grad():
            row.err32 = relative_error(fused(x), y)
        row.untouched = _same(model, snap)
        row.before, row.after = count_kernels(model, x), count_kernels(fused, x)

        m64, x64 = copy.deepcopy(model).double(), x.double()
        with torch.no_grad():
            y64 = m64(x64)
        f64 = reparam.fuse(m64, (x64,))
        with torch.no_grad():
            row.err64 = relative_error(f64(x64), y64)

        deploy, row.ref = reference_deploy(model)
        if deploy is not None:
            row.timm = count_kernels(deploy, x)
            with torch.no_grad():
                row.timm_err = relative_error(deploy(x), y)
    except Exception as err:  # noqa: BLE001  keep sweeping; the table says what broke
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        if os.environ.get("COVERAGE_TRACEBACK"):
            traceback.print_exc()
    return row


# ----------------------------------------------------------------------------------------------- table


def _kb(counts: Optional[dict]) -> str:
    return f"{counts['conv']}/{counts['batch_norm']}" if counts else "-"


def _err(e: Optional[float]) -> str:
    return "-" if e is None else f"{e:.0e}"


def _summary(rows: list, ref: str, label: str) -> str:
    mine = [r for r in rows if r.ref == ref and r.vs_timm() != "-"]
    beats = sum(r.vs_timm() == "beats" for r in mine)
    loses = [r.name.removeprefix("tv:") for r in mine if r.vs_timm() == "LOSES"]
    text = (
        f"against {label} on the {len(mine)} models it handles: fewer convs+BNs on {beats}, "
        f"as few on {len(mine) - beats - len(loses)}, more on {len(loses)}"
    )
    return text + (f" ({', '.join(loses)})" if loses else "")


def markdown(rows: list, title: str = "", command: str = "", families: Optional[dict] = None) -> str:
    skipped = [r for r in rows if r.skipped]
    rows_run = [r for r in rows if not r.skipped]
    exact = sum(r.exact for r in rows_run)
    cpu = sorted(r.cpu_s for r in rows if r.cpu_s is not None)
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines += [
        f"**{exact}/{len(rows_run)} models fused exactly** (float32 relative error <= {FP32_TOL:g} against the float32 "
        f"original, float64 <= {FP64_TOL:g}, input model untouched); "
        + _summary(rows, "timm", "timm's own deploy path (`timm.utils.model.reparameterize_model`)")
        + "; "
        + _summary(rows, "fx", "PyTorch's conv/BN folding (`torch.fx.experimental.optimization.fuse`)")
        + "."
        + (f" {len(skipped)} models too large for this machine were skipped." if skipped else ""),
        "",
        "Kernels: executed `aten` ops counted by `reparam.stats.count_kernels`, as `convs/BNs`. Models: random "
        "weights (`pretrained=False`), BN running_mean ~ N(0, 0.1), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5); "
        "the smallest square input the model accepts (timm models with a fixed resolution built for it), batch 2. "
        "Reference: timm's deploy path where the model has one, else `torch.fx` folding (`-`: neither applies). "
        "Fuse time: `reparam.fuse(model, (x,))` including its float64 verification, process CPU seconds "
        "(wall seconds in brackets; with several torch threads CPU seconds add up over the cores)"
        + (f"; median {cpu[len(cpu) // 2]:.1f} s, max {cpu[-1]:.1f} s." if cpu else "."),
        "",
    ]
    if families:
        lines += [
            "Swept: every model of the timm model modules that define a block with a `fuse`, `reparameterize` or "
            "`switch_to_deploy` method (found by scanning `timm.models`, not a hand-kept list: "
            + ", ".join(f"`{m}` ({len(n)})" for m, n in families.items())
            + "), and torchvision's classification nets.",
            "",
        ]
    losing = [r for r in rows_run if r.vs_timm() == "LOSES" or not r.exact]
    if losing:
        reasons: dict = {}
        for r in losing:
            reasons.setdefault(known_issue(r.name) or r.error or "not yet analysed", []).append(
                f"`{r.name.removeprefix('tv:')}`"
            )
        lines += ["Where reparam does worse than the reference, or is not exact:", ""]
        lines += [f"- {', '.join(names)}: {why}." for why, names in reasons.items()]
        lines += [""]
    lines += [
        "| model | source | input | exact | rel. err fp32 / fp64 | before | after | reference | ref. after | vs ref. "
        "| fuse s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r.name.removeprefix("tv:")
        if r.skipped:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - | - | - | {r.skipped} |")
            continue
        if r.error:
            lines.append(
                f"| {name} | {r.source or '-'} | {r.size or '-'} | **error** | - | - | - | - | - | - | - "
                f"| {r.error.replace('|', '/')} |"
            )
            continue
        mark = "yes" if r.exact else "**NO**"
        notes = "; ".join(r.notes)[:240].replace("|", "/")
        lines.append(
            f"| {name} | {r.source} | {r.size} | {mark} | {_err(r.err32)} / {_err(r.err64)} | {_kb(r.before)} | "
            f"{_kb(r.after)} | {r.ref or '-'} | {_kb(r.timm)} | {r.vs_timm()} | {r.cpu_s:.1f} ({r.wall_s:.0f}) "
            f"| {notes} |"
        )
    lines += [
        "",
        f"torch {torch.__version__}, {_versions()}, {platform.machine()}; generated by "
        f"`{command or 'python benchmarks/coverage.py'}`.",
        "",
    ]
    return "\n".join(lines)


def family_of(name: str) -> str:
    """timm model module (``byobnet``, ``fastvit``, ...) or ``torchvision``."""
    if name.startswith("tv:"):
        return "torchvision"
    from timm.models import _registry

    return _registry._model_to_module.get(name, "timm")


def family_table(rows: list, details: str, command: str) -> str:
    """Per-family summary: models, exact, conv+BN kernels before -> after, the reference's after, slowest fuse."""
    families: dict = {}
    for r in rows:
        families.setdefault(family_of(r.name), []).append(r)
    lines = [
        "| family | models | exact | convs / BNs before → after (sum) | reference after | vs reference "
        "(beats / ties / loses) | slowest fuse, s |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, group in sorted(families.items()):
        run = [r for r in group if not r.skipped and not r.error]
        exact = sum(r.exact for r in run)
        before = [sum(r.before.get(k, 0) for r in run) for k in ("conv", "batch_norm")]
        after = [sum(r.after.get(k, 0) for r in run) for k in ("conv", "batch_norm")]
        ref_rows = [r for r in run if r.timm is not None]
        ref = [sum(r.timm.get(k, 0) for r in ref_rows) for k in ("conv", "batch_norm")]
        refs = sorted({r.ref for r in ref_rows})
        verdicts = [r.vs_timm() for r in ref_rows]
        wall = max((r.wall_s for r in run if r.wall_s is not None), default=None)
        skipped, failed = sum(bool(r.skipped) for r in group), sum(bool(r.error) for r in group)
        aside = ", ".join(
            ([f"{skipped} too large, skipped"] if skipped else []) + ([f"{failed} FAILED"] if failed else [])
        )
        lines.append(
            f"| {family} | {len(group)}"
            + (f" ({aside})" if aside else "")
            + f" | {exact}/{len(run)} | {before[0]}/{before[1]} → {after[0]}/{after[1]} | "
            + (f"{ref[0]}/{ref[1]} ({', '.join(refs)}, {len(ref_rows)} models)" if ref_rows else "-")
            + f" | {verdicts.count('beats')} / {verdicts.count('ties')} / {verdicts.count('LOSES')} | "
            + (f"{wall:.1f}" if wall is not None else "-")
            + " |"
        )
    lines += [
        "",
        "Fuse time: wall seconds of `reparam.fuse(model, (x,))` with its float64 verification, on the "
        "smallest square input the model accepts, batch 2. "
        f"Per-model table: [{details}]({details}); generated by `{command}` "
        f"(torch {torch.__version__}, {_versions()}).",
        "",
    ]
    return "\n".join(lines)


README_START, README_END = "<!-- coverage:start -->", "<!-- coverage:end -->"


def update_readme(path: str, table: str, start: str = README_START, end: str = README_END) -> None:
    """Replace the text between the markers ``start`` and ``end`` of ``path`` with ``table`` (written atomically)."""
    with open(path) as f:
        text = f.read()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no {start} ... {end} markers to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{head}{start}\n{table}{end}{tail}")
    os.replace(tmp, path)


def marked_sections(path: str) -> list:
    """The ``<!-- NAME:start --> ... <!-- NAME:end -->`` sections of ``path`` (none if it does not exist): other
    scripts' tables (benchmarks/deploy_coverage.py's), kept when this script rewrites the file."""
    import re

    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    return [m.group(0) for m in re.finditer(r"<!-- (\w+):start -->.*?<!-- \1:end -->", text, re.S)]


def _versions() -> str:
    out = []
    for mod in ("timm", "torchvision"):
        try:
            out.append(f"{mod} {importlib.import_module(mod).__version__}")
        except ImportError:  # not installed: not named
            pass
    return ", ".join(out)


def model_names(all_models: bool) -> list:
    if not all_models:
        return SLICE_TIMM + [f"tv:{n}" for n in SLICE_TV]
    timm_names = [n for names in timm_families().values() for n in names]
    return timm_names + [f"tv:{n}" for n in all_torchvision()]


def _child(name: str, max_params, threads: int, conn) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    conn.send(measure(name, max_params=max_params))
    conn.close()


def measure_parallel(names: list, jobs: int, on_row=None, max_params=None, threads: int = 1) -> list:
    """:func:`measure` each model in its own forked process, ``jobs`` at a time; a process that dies
    (out of memory, say) costs its row only.  Rows come back in the order of ``names``."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    pending, running, done = list(enumerate(names)), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            index, name = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(name, max_params, threads, send), daemon=True)
            proc.start()
            send.close()
            running[index] = (name, proc, recv)
        ready = mp.connection.wait([r for _, _, r in running.values()], timeout=5)
        for index, (name, proc, recv) in list(running.items()):
            if recv in ready or not proc.is_alive():
                try:
                    row = recv.recv()
                except (EOFError, OSError):
                    proc.join()
                    row = Row(name, error=f"process died (exit code {proc.exitcode}; out of memory?)")
                proc.join()
                done[index] = row
                del running[index]
                if on_row:
                    on_row(row)
    return [done[i] for i in range(len(names))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (tv:NAME for torchvision); default: the slice")
    parser.add_argument(
        "--all",
        action="store_true",
        help="every model of every timm family with a deploy method, and the torchvision classification nets",
    )
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--jobs", type=int, default=1, help="models measured in parallel (one process each)")
    parser.add_argument(
        "--isolate", action="store_true", help="measure each model in its own process (implied by --jobs > 1)"
    )
    parser.add_argument(
        "--max-params",
        type=float,
        default=150e6,
        help="skip models with more parameters "
        "(float64 copies of giant models exhaust a small machine's memory); default 150e6",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per model (default: all cores with --jobs 1, else 1)"
    )
    parser.add_argument(
        "--readme",
        help="also rewrite the per-family summary between the coverage markers of this markdown file (README.md)",
    )
    parser.add_argument("--list", action="store_true", help="print the model names and exit")
    parser.add_argument("--json", help="also keep the raw rows in this JSON file")
    parser.add_argument("--from-json", help="re-render the table from a --json file instead of measuring")
    args = parser.parse_args(argv)
    names = args.models or model_names(args.all)
    if args.list:
        print("\n".join(names))
        return 0
    threads = args.threads or (1 if args.jobs > 1 else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    command = (
        "python benchmarks/coverage.py"
        + (" --all" if args.all else "")
        + (" " + " ".join(args.models) if args.models else "")
        + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
        + (f" --out {args.out}" if args.out else "")
    )
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        rows, command = [Row(**r) for r in saved["rows"]], saved.get("command", command)
    elif args.jobs > 1 or args.isolate:
        rows = measure_parallel(names, args.jobs, _progress, args.max_params, threads)
    else:
        rows = []
        for name in names:
            rows.append(measure(name, max_params=args.max_params))
            _progress(rows[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "rows": [asdict(r) for r in rows]}, f, indent=1)
    families = timm_families() if (args.all or args.from_json) else None
    table = markdown(rows, "reparam.fuse on third-party models", command, families)
    print(table)
    if args.out:
        kept = marked_sections(args.out)
        with open(args.out, "w") as f:
            f.write(table + "".join(f"\n{section}\n" for section in kept))
    if args.readme:
        update_readme(args.readme, family_table(rows, args.out or "docs/coverage.md", command))
    return 0 if all(r.skipped or (r.exact and r.vs_timm() != "LOSES") for r in rows) else 1


def _progress(row: Row) -> None:
    status = (
        "exact"
        if row.exact
        else (
            row.skipped or ("ERROR " + row.error)
            if row.skipped or row.error
            else f"INEXACT {_err(row.err32)}/{_err(row.err64)}"
        )
    )
    print(
        f"# {row.name}: {status} {_kb(row.before)} -> {_kb(row.after)} {row.ref or 'ref'} {_kb(row.timm)} "
        f"{row.vs_timm()} cpu {row.cpu_s or 0:.1f}s wall {row.wall_s or 0:.1f}s {'; '.join(row.notes)[:150]}",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
