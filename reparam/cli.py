"""The ``reparam`` command line: ``convert``, ``inspect`` and ``list``.

``convert`` writes any of ``.pt2`` (-o), ``.onnx`` (--onnx), ``.pte`` (--pte, ExecuTorch with XNNPACK) and
``.mlpackage`` (--coreml, Core ML), optionally in another precision (--dtype float16/bfloat16, folded in float64);
``inspect --quant`` adds a per-layer int8 weight-quantization report of the fused model (:mod:`reparam.quant`).

``main(argv) -> int`` runs in-process and returns the exit code: 0 on success, 2 for bad input or usage
(missing/corrupt/unsafe checkpoint, unknown architecture, keys that do not match, example inputs of the wrong
shape, a model that overflows the requested --dtype, an output that exists without --force or cannot be written:
missing or read-only directory, full disk...), 1 when verification fails (the fused model or an exported file
disagrees with the original) or another step fails, 128 + N on signal N (SIGINT 130, SIGTERM 143, SIGHUP 129).
Errors are one line, ``error: <problem>. <fix>``; ``--debug`` adds the traceback.  Progress goes to stderr, the
report to stdout.

Outputs are all or nothing (:mod:`reparam.staging`): every file is written and verified beside its target under
a hidden staging directory, and only when all of them pass are they moved into place; a failure or a signal
leaves the output directories as they were.  The same checkpoint and flags give byte-identical files.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from reparam import int8_convert, io, staging, stats
from reparam.errors import EquivalenceError, ReparamError

__all__ = ["main", "build_parser"]

PROG = "reparam"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MOBILE_HINT = "pip install 'reparam[mobile]'"
DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)
LATENCY_WARMUP, LATENCY_REPEATS, LATENCY_BUDGET_S = 2, 10, 2.0  # the report's "quick latency"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(io.InputError):
    """The command line itself is wrong (exit code 2)."""


# ------------------------------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as a :class:`UsageError` instead of printing and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message}. Run `{self.prog} --help` for usage")


def input_shape(text: str) -> tuple[int, ...]:
    """Parse ``1,3,224,224`` (or ``1x3x224x224``) into a shape of positive integers."""
    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid shape {text!r}: expected comma-separated integers like 1,3,224,224") from None
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"invalid shape {text!r}: expected a batch size and at least one more "
                                         "dimension, all positive, like 1,3,224,224")
    return shape


def positive_int(text: str) -> int:
    """Parse a strictly positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _model_options(parser: argparse.ArgumentParser, checkpoint_required: bool) -> None:
    """Options shared by ``convert`` and ``inspect``: where the model and its weights come from."""
    parser.add_argument("checkpoint", nargs=None if checkpoint_required else "?", type=Path, metavar="CHECKPOINT",
                        help="weights: a torch.save file (.pt/.pth, a plain or wrapped state dict) or .safetensors"
                        + ("" if checkpoint_required else "; omitted: random weights"))
    parser.add_argument("--arch", required=True, metavar="NAME",
                        help="architecture: a reparam.models name (see `reparam list`), timm:NAME or torchvision:NAME")
    parser.add_argument("--input-shape", type=input_shape, metavar="N,C,H,W",
                        help="example input shape, batch first (default: the architecture's, else 1,3,224,224)")
    parser.add_argument("--num-classes", type=positive_int, metavar="N",
                        help="classifier outputs (default: read from the checkpoint's classifier, else the architecture's)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a pickle checkpoint to run code while loading (only for files you trust)")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights when the checkpoint has both")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``reparam`` command."""
    parser = _Parser(prog=PROG, description="Structural re-parameterization: fuse multi-branch training-time "
                     "networks into plain deploy models, exactly.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    convert = commands.add_parser("convert", help="fuse a checkpoint into a verified deploy model "
                                  "(.pt2 / .onnx / .pte / .mlpackage)",
                                  description="Load CHECKPOINT into --arch, fuse it, verify it and write deploy files. "
                                  "Without -o/--onnx/--pte/--coreml, writes <checkpoint stem>_deploy.pt2 next to the "
                                  "checkpoint.")
    _model_options(convert, checkpoint_required=True)
    convert.add_argument("-o", "--output", type=Path, metavar="OUT.pt2", help="write a torch.export program here")
    convert.add_argument("--onnx", type=Path, metavar="OUT.onnx", help="write an ONNX model here (dynamic batch axis)")
    convert.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset, 17 or later (default 18)")
    convert.add_argument("--pte", type=Path, metavar="OUT.pte", help="write an ExecuTorch program lowered to XNNPACK "
                         f"here, verified in ExecuTorch's runtime (needs {_MOBILE_HINT})")
    convert.add_argument("--coreml", type=Path, metavar="OUT.mlpackage", help="write a Core ML package here "
                         f"(conversion only: not run off macOS; needs coremltools, e.g. {_MOBILE_HINT})")
    convert.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="precision of the deploy model and "
                         "files (folded in float64, rounded once; default: the model's own). Exported files then take "
                         "inputs of this dtype (a Core ML package still takes float32 inputs and computes in float16). "
                         "Checked first: a model whose activations overflow the dtype, or that loses too much accuracy "
                         "in it, is refused with the module where it happens (see reparam.precision)")
    convert.add_argument("--no-check", action="store_true",
                         help="report but do not fail on differences between the original, fused and exported models")
    convert.add_argument("--remove-residuals", action="store_true",
                         help="also merge identity residuals into convolutions where exact (passed to reparam.fuse)")
    convert.add_argument("--force", action="store_true", help="replace output files that exist already (they are "
                         "replaced only once every output is written and verified)")
    int8_convert.add_options(convert)
    convert.set_defaults(func=cmd_convert)

    inspect = commands.add_parser("inspect", help="show what will merge, what will not and why",
                                  description="Explain the branch structure of --arch (with CHECKPOINT's weights, if "
                                  "given): every merge reparam will do and every merge it refuses, with the reason.")
    _model_options(inspect, checkpoint_required=False)
    inspect.add_argument("--graph", type=Path, metavar="FILE", help="draw one block before and after fusion "
                         "(.svg/.png/.pdf with Graphviz or matplotlib; .dot writes Graphviz source)")
    inspect.add_argument("--force", action="store_true", help="replace the --graph file if it exists")
    inspect.add_argument("--block", metavar="NAME", help="the submodule to draw (default: the first multi-branch block)")
    inspect.add_argument("--quant", action="store_true", help="report how each fused conv/linear layer's weights "
                         "survive int8 quantization (range, outliers, per-tensor / per-channel SNR) and flag the "
                         "layers that will hurt (see docs/quantization.md)")
    inspect.set_defaults(func=cmd_inspect)

    listing = commands.add_parser("list", help="list the available architectures",
                                  description="List the reparam.models architectures and the timm:/torchvision: sources.")
    listing.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    listing.set_defaults(func=cmd_list)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("reparam")
    except Exception:  # pragma: no cover - not installed
        import reparam

        return getattr(reparam, "__version__", "unknown")


# ------------------------------------------------------------------------------------------------- helpers


@dataclass
class Ui:
    """Where the command writes: the report (stdout) and progress / errors (stderr)."""

    out: Console
    err: Console

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        """Show a spinner while a step runs, then a tick and its duration."""
        start = time.perf_counter()
        with self.err.status(f"{text}…"):
            yield
        self.err.print(f"[green]✓[/] {text} [dim]({time.perf_counter() - start:.1f}s)[/]", highlight=False)


def _make_ui() -> Ui:
    return Ui(out=Console(file=sys.stdout), err=Console(file=sys.stderr, stderr=True))


@dataclass
class LoadedModel:
    """A model ready to fuse, with its example input and where its weights came from."""

    model: torch.nn.Module
    example: torch.Tensor
    source: str
    num_classes: int | None


def _load_model(args: argparse.Namespace, ui: Ui) -> LoadedModel:
    """Read the checkpoint (if any), build ``--arch`` and load the weights strictly."""
    checkpoint = None
    if args.checkpoint is not None:
        with ui.step(f"Reading {args.checkpoint.name}"):
            checkpoint = io.read_checkpoint(args.checkpoint, trust=args.trust_checkpoint, prefer_ema=args.ema)
    num_classes = args.num_classes
    if num_classes is None and checkpoint is not None:
        num_classes = io.infer_num_classes(checkpoint.state_dict)
    with ui.step(f"Building {args.arch}"):
        model = io.build_model(args.arch, num_classes)
        if checkpoint is not None:
            io.load_strict(model, checkpoint.state_dict)
    shape = args.input_shape or io.default_input_shape(args.arch, model) or DEFAULT_INPUT_SHAPE
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(shape, generator=generator)
    _check_runs(model, example, args.arch)
    if checkpoint is not None and args.ema and not _has_ema(checkpoint):
        checkpoint.notes.append("no EMA weights in it: used the plain weights")
        ui.err.print(f"note: --ema: {args.checkpoint.name} has no EMA weights (none of "
                     f"{', '.join(io.EMA_KEYS)}); using the plain weights", highlight=False, soft_wrap=True)
    if checkpoint is None:
        source = "random weights (no checkpoint)"
    else:
        source = " ".join([checkpoint.source] + [f"({n})" for n in checkpoint.notes])
    return LoadedModel(model, example, source, num_classes)


def _has_ema(checkpoint: io.Checkpoint) -> bool:
    """Whether the weights were read from one of the checkpoint's EMA entries."""
    return any(f"[{key!r}]" in checkpoint.source for key in io.EMA_KEYS)


def _check_runs(model: torch.nn.Module, example: torch.Tensor, arch: str) -> None:
    """Run the model once so that an input it cannot take is reported as bad input, not as a fusion failure."""
    from reparam import shapes

    shape = ",".join(map(str, example.shape))
    try:
        shapes.run_checked(model, example)
    except shapes.InputShapeError as exc:
        raise shapes.InputShapeError(f"{arch} cannot run on an input of shape {shape}: {exc.reason}. Pass "
                                     f"--input-shape {','.join(exc.layout)} with numbers, e.g. "
                                     f"{_example_shape(exc.layout, example.shape)}", exc.shape, exc.reason,
                                     exc.layout) from exc
    except Exception as exc:
        raise UsageError(f"{arch} cannot run on an input of shape {shape} ({type(exc).__name__}: "
                         f"{_one_line(exc)}). Pass the right --input-shape") from exc


def _example_shape(layout: tuple[str, ...], given: Sequence[int]) -> str:
    """``layout`` (``N, 1, H, W``) filled in: the given batch (when the rank fits) and trailing sizes, else 1 and 224."""
    spatial = len(layout) - 2
    sizes = list(given[len(given) - spatial:]) if 0 < spatial <= len(given) else [224] * spatial
    batch = given[0] if len(given) == len(layout) else 1
    return ",".join(map(str, [batch, layout[1], *sizes]))


def _fuse(model: torch.nn.Module, example: torch.Tensor, **kwargs: Any) -> torch.nn.Module:
    import reparam

    try:
        return reparam.fuse(model, (example,), **kwargs)
    except NotImplementedError as exc:
        raise UsageError(f"{exc}. Leave out the option that needs it") from exc


_RUN_LABELS = {"pt2": ".pt2 reloaded", "onnx": ".onnx in ORT", "pte": ".pte in ExecuTorch"}
_KERNEL_LABELS = (("conv", "convolution"), ("batch_norm", "batch norm"), ("add", "tensor add"), ("linear", "linear"))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _change(before: float, after: float) -> str:
    if before == after:
        return "="
    if before == 0:
        return "new"
    change = (after - before) / before
    return f"{change:+.1%}" if abs(change) < 0.095 else f"{change:+.0%}"


def _speedup(before: float, after: float) -> str:
    if before <= 0 or after <= 0:
        return ""
    return f"{before / after:.2f}× faster" if before >= after else f"{after / before:.2f}× slower"


# ------------------------------------------------------------------------------------------------- convert


@dataclass
class Measures:
    """What the report compares between the original and the fused model."""

    params: int
    macs: int
    kernels: dict[str, int]
    latency: float


def _measure(model: torch.nn.Module, fused: torch.nn.Module, example: torch.Tensor) -> tuple[Measures, Measures]:
    """Measures of the original and the fused model; latencies timed interleaved."""
    latency = stats.latencies_ms([model, fused], example, warmup=LATENCY_WARMUP, repeats=LATENCY_REPEATS,
                                 budget_s=LATENCY_BUDGET_S)
    return tuple(Measures(params=stats.count_params(m), macs=stats.count_macs(m, example),
                          kernels=stats.count_kernels(m, example), latency=t) for m, t in zip((model, fused), latency))


@dataclass
class Outputs:
    """The files ``convert`` writes (None: not requested)."""

    pt2: Path | None = None
    onnx: Path | None = None
    pte: Path | None = None
    coreml: Path | None = None


_SUFFIX_OPTIONS = {".onnx": "--onnx", ".pte": "--pte", ".mlpackage": "--coreml"}


def _outputs(args: argparse.Namespace) -> Outputs:
    """The paths to write, validated before any work is done."""
    pt2, onnx_path = args.output, args.onnx
    pte, coreml = getattr(args, "pte", None), getattr(args, "coreml", None)
    if pt2 is not None and pt2.suffix.lower() in _SUFFIX_OPTIONS:
        option = _SUFFIX_OPTIONS[pt2.suffix.lower()]
        what = {".onnx": "ONNX", ".pte": "an ExecuTorch program", ".mlpackage": "a Core ML package"}[pt2.suffix.lower()]
        raise UsageError(f"-o writes a torch.export program, not {what} ({pt2}). Use {option} {pt2} for that")
    if pte is not None and pte.suffix.lower() != ".pte":
        raise UsageError(f"--pte writes an ExecuTorch program, whose file name ends in .pte ({pte}). "
                         f"Name it {pte.with_suffix('.pte').name}")
    if coreml is not None and coreml.suffix.lower() != ".mlpackage":
        raise UsageError(f"--coreml writes a Core ML package, a directory whose name ends in .mlpackage ({coreml}). "
                         f"Name it {coreml.with_suffix('.mlpackage').name}")
    if pt2 is None and onnx_path is None and pte is None and coreml is None:
        pt2 = args.checkpoint.with_name(f"{args.checkpoint.stem}_deploy.pt2")
    if args.opset is not None and onnx_path is None:
        raise UsageError("--opset only applies to ONNX output. Add --onnx OUT.onnx")
    named = [(flag, path) for flag, path in (("-o", pt2), ("--onnx", onnx_path), ("--pte", pte), ("--coreml", coreml))
             if path is not None]
    for i, (flag_a, a) in enumerate(named):
        for flag_b, b in named[i + 1:]:
            if io.same_file(a, b):
                raise UsageError(f"{flag_a} and {flag_b} name the same file {a}. Give them different names")
    for flag, path in named:
        if flag == "--coreml" and path.is_dir() and not path.is_symlink():
            if not (path / "Manifest.json").is_file():
                raise UsageError(f"output {path} is a directory but not a Core ML package. Choose another name")
            io.check_output_path(path.parent / f"{path.name}.new", inputs=[args.checkpoint])  # replaced when done
            continue
        io.check_output_path(path, inputs=[args.checkpoint])
    _refuse_existing(named, args.force)
    return Outputs(pt2, onnx_path, pte, coreml)


def _refuse_existing(named: Sequence[tuple[str, Path]], force: bool) -> None:
    """Without ``--force``, an output that exists already is a usage error (nothing is replaced by surprise)."""
    for flag, path in named:
        if not force and (path.exists() or path.is_symlink()):
            raise UsageError(f"{flag} {path} exists already. Pass --force to replace it (replaced only once every "
                             "output is written and verified), or choose another path")


def _check_dtype(args: argparse.Namespace, outputs: Outputs) -> torch.dtype | None:
    """The ``--dtype`` asked for, after refusing the output formats that cannot hold it."""
    if args.dtype is None:
        return None
    dtype = DTYPES[args.dtype]
    if dtype == torch.bfloat16 and outputs.onnx is not None:
        raise UsageError("ONNX has no bfloat16 convolution, so ONNX Runtime cannot run a bfloat16 model. "
                         "Use --dtype float16 for --onnx, or leave out --onnx")
    if outputs.pte is not None or outputs.coreml is not None:
        from reparam import mobile

        try:
            if outputs.pte is not None:
                mobile.check_pte_dtype(dtype)
            if outputs.coreml is not None:
                mobile.check_coreml_dtype(dtype)
        except mobile.UnsupportedDtypeError as exc:
            raise UsageError(str(exc)) from exc
    return dtype


def _require_mobile_packages(outputs: Outputs) -> None:
    """Import ExecuTorch / coremltools now when their outputs are asked for, so a missing one fails before any work."""
    if outputs.pte is None and outputs.coreml is None:
        return
    from reparam import mobile

    if outputs.pte is not None:
        mobile.require_executorch()
    if outputs.coreml is not None:
        mobile.require_coremltools()


def cmd_convert(args: argparse.Namespace, ui: Ui) -> int:
    """``reparam convert``: load, fuse, verify, export, report."""
    from reparam import export

    if args.opset is not None and args.opset < export.MIN_OPSET:
        raise UsageError(f"ONNX opset {args.opset} is too old. Use --opset {export.MIN_OPSET} or later "
                         f"(default {export.DEFAULT_OPSET})")
    io.check_checkpoint_path(args.checkpoint)
    outputs = _outputs(args)
    int8_convert.check_options(args, outputs.onnx is not None, outputs.pte is not None)
    dtype = _check_dtype(args, outputs)
    _require_mobile_packages(outputs)
    loaded = _load_model(args, ui)
    model, example = loaded.model, loaded.example
    check = not args.no_check

    options: dict[str, Any] = {"check": check, "remove_residuals": args.remove_residuals}
    if args.equalize:
        options["equalize"] = True
    calibration = int8_convert.load_calibration(args, model, tuple(example.shape)) if args.int8 else None
    if dtype is not None:
        options["dtype"] = dtype
    if dtype is not None and dtype != example.dtype:
        from reparam import precision

        with ui.step(f"Checking that the model's activations fit {args.dtype}"):
            precision.check_precision(model, example, dtype)
    with ui.step("Fusing" if dtype is None else f"Fusing (deploy precision {args.dtype})"):
        fused = _fuse(model, example, **options)
    deploy_dtype = _floating_dtype(fused) or example.dtype
    deploy_example = example.to(deploy_dtype)
    # the original keeps its own dtype: give it the deploy inputs cast back, and compare in float64
    original = model if deploy_dtype == example.dtype else _cast_inputs(model, example.dtype)
    runnable = fused if deploy_dtype == example.dtype else _cast_inputs(fused, deploy_dtype)
    with ui.step("Measuring"):
        before, after = _measure(model, runnable, example)
        with torch.no_grad():
            fused_error = stats.relative_error(fused(deploy_example), model(example))

    results = []
    with staging.Staging() as stage:  # every file is written and verified beside its target, then all move in
        if outputs.pt2 is not None or outputs.onnx is not None:
            with ui.step("Tracing with torch.export"):
                program = export.export_program(fused, deploy_example)
        if outputs.pt2 is not None:
            with ui.step(f"Writing and verifying {outputs.pt2.name}"):
                results.append(export.export_pt2(fused, deploy_example, stage.path(outputs.pt2), original=original,
                                                 program=program, check=check))
        if outputs.onnx is not None and not args.int8:
            with ui.step(f"Writing and verifying {outputs.onnx.name} in ONNX Runtime"):
                results.append(export.export_onnx(fused, deploy_example, stage.path(outputs.onnx),
                                                  args.opset or export.DEFAULT_OPSET, original=original,
                                                  program=program, check=check))
        if args.int8:
            results += int8_convert.write(fused, model, calibration, args, stage, ui, outputs.onnx, outputs.pte)
        if outputs.pte is not None and not args.int8:
            from reparam import mobile

            with ui.step(f"Lowering to ExecuTorch (XNNPACK), writing and verifying {outputs.pte.name}"):
                results.append(mobile.export_pte(fused, deploy_example, stage.path(outputs.pte), original=original,
                                                 check=check))
        if outputs.coreml is not None:
            from reparam import mobile

            with ui.step(f"Converting to Core ML, writing {outputs.coreml.name}"):
                results.append(mobile.export_coreml(fused, example, stage.path(outputs.coreml),
                                                    precision=deploy_dtype))
        targets = [path for path in (outputs.pt2, outputs.onnx, outputs.pte, outputs.coreml) if path is not None]
        replaced = stage.commit()
    for result, target in zip(results, targets):
        result.path = target
    for path in replaced:
        ui.err.print(f"note: --force: replaced the existing {path}", highlight=False, soft_wrap=True)

    _print_convert_report(ui, args, loaded, before, after, fused_error, results, getattr(fused, "reparam_report", None))
    int8_convert.print_report(ui, results, fused)
    return EXIT_OK


def _floating_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter or buffer."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _cast_inputs(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    from reparam.mobile import CastInputs

    return CastInputs(model, dtype)


def _print_convert_report(ui, args, loaded, before: Measures, after: Measures, fused_error: float, results, report) -> None:
    table = Table(title=f"{args.arch}: {args.checkpoint.name} → deploy", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    table.add_row("parameters", _fmt_count(before.params), _fmt_count(after.params), _change(before.params, after.params))
    table.add_row("MACs", _fmt_count(before.macs), _fmt_count(after.macs), _change(before.macs, after.macs))
    for key, label in _KERNEL_LABELS:
        b, a = before.kernels[key], after.kernels[key]
        table.add_row(f"{label}s run", str(b), str(a), _change(b, a))
    ckpt_size = args.checkpoint.stat().st_size
    for result in results:
        table.add_row(f"file size (.{result.format})", _fmt_bytes(ckpt_size), _fmt_bytes(result.size),
                      _change(ckpt_size, result.size))
    batch = tuple(loaded.example.shape)
    table.add_row(f"latency, input {','.join(map(str, batch))}", f"{before.latency:.2f} ms", f"{after.latency:.2f} ms",
                  _speedup(before.latency, after.latency))
    table.add_section()  # errors: relative L2 vs the original model on the example input (and another batch size)
    table.add_row("rel. error, fused model", "", f"{fused_error:.1e}", "")
    for result in results:
        if not result.errors:  # not run (Core ML off macOS)
            continue
        where = _RUN_LABELS.get(result.format, f".{result.format}")
        table.add_row(f"rel. error, {where}", "", f"{result.errors.get('original', 0.0):.1e}", "")
    ui.out.print(table)
    ui.out.print(f"weights: {loaded.source}; classes: {loaded.num_classes or 'architecture default'}", highlight=False)
    if report is not None and getattr(report, "rewrites", None) is not None:
        counts = report.counts() if hasattr(report, "counts") else {}
        detail = ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))
        ui.out.print(f"rewrites: {len(report.rewrites)} regions ({detail or 'none'}); "
                     f"refused: {len(report.refusals)} (see `reparam inspect`)", highlight=False)
    if getattr(args, "dtype", None) is not None:
        ui.out.print(f"precision: {args.dtype} (folded in float64, rounded once; errors are against the "
                     f"{str(loaded.example.dtype).replace('torch.', '')} original)", highlight=False)
    if args.no_check:
        ui.out.print("[yellow]--no-check: differences were reported, not enforced[/]")
    for result in results:
        details = [_fmt_bytes(result.size), "dynamic batch" if result.dynamic_batch else "static batch"]
        if result.opset is not None:
            details.append(f"opset {result.opset}")
        precision = getattr(result, "precision", None)
        if result.format in ("pte", "mlpackage") and precision:
            details.append(precision)
        if result.format == "pte":
            delegated, total = getattr(result, "delegated", None), getattr(result, "total_ops", None)
            if delegated is not None and total:
                details.append(f"XNNPACK runs {delegated} of {total} ops")
            details.append(f"verified in {getattr(result, 'verified_in', None) or 'ExecuTorch'}")
        if result.format == "mlpackage":
            details.append("converted, not run: Core ML needs macOS")
        ui.out.print(f"wrote {result.path} ({', '.join(details)})", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace, ui: Ui) -> int:
    """``reparam inspect``: explain what will merge and what will not, optionally draw a block."""
    import reparam

    from reparam import export

    if args.graph is not None:
        io.check_output_path(args.graph, inputs=[args.checkpoint] if args.checkpoint else [])
        _refuse_existing([("--graph", args.graph)], args.force)
        export.graph_renderer(args.graph)
    elif args.block is not None:
        raise UsageError("--block chooses the block to draw. Add --graph FILE.svg")
    loaded = _load_model(args, ui)
    if args.block is not None:
        _submodule(loaded.model, args.block)
    with ui.step("Analysing"):
        kernels = stats.count_kernels(loaded.model, loaded.example)
        report = reparam.explain(loaded.model, (loaded.example,))
    _print_inspect_report(ui, args, loaded, kernels, report)
    if getattr(args, "quant", False):
        from reparam import quant

        with ui.step("Fusing and analysing weight quantization"):
            fused = reparam.fuse(loaded.model, (loaded.example,))
            analysis = quant.analyze_model(fused)
        _print_quant_report(ui, analysis)
    if args.graph is not None:
        with ui.step(f"Drawing {args.graph.name}"):
            block, renderer = _draw_block(loaded, args.block, args.graph)
        ui.out.print(f"drew {block} before and after into {args.graph} ({renderer})", highlight=False, soft_wrap=True)
    return EXIT_OK


def _print_inspect_report(ui: Ui, args, loaded: LoadedModel, kernels: dict, report: Any) -> None:
    ui.out.print(f"[bold]{args.arch}[/] — weights: {loaded.source}; input {','.join(map(str, loaded.example.shape))}",
                 highlight=False)
    counts = ", ".join(_plural(kernels[key], label) for key, label in _KERNEL_LABELS)
    ui.out.print(f"executes: {counts}", highlight=False)
    rewrites, refusals = getattr(report, "rewrites", None), getattr(report, "refusals", None)
    if rewrites is None or refusals is None:  # an unknown report type: its own text is the best we have
        ui.out.print(str(report))
        return
    merges = Table(title=f"will merge ({len(rewrites)} regions)", title_justify="left")
    for column in ("where", "before", "after", "rewrites"):
        merges.add_column(column)
    for rewrite in rewrites:
        merges.add_row(*_rewrite_cells(rewrite))
    ui.out.print(merges)
    if not refusals:
        ui.out.print("will not merge: nothing refused")
    else:
        refused = Table(title=f"will not merge ({len(refusals)})", title_justify="left")
        refused.add_column("where")
        refused.add_column("why")
        for refusal in refusals:
            where, reason = (refusal.where, refusal.reason) if hasattr(refusal, "reason") else tuple(refusal)[:2]
            refused.add_row(str(where), str(reason))
        ui.out.print(refused)
    for note in getattr(report, "notes", []):
        ui.out.print(f"note: {note}", highlight=False)


def _fmt_db(value: float) -> str:
    return "exact" if value == float("inf") else f"{value:.1f}"


def _print_quant_report(ui: Ui, analysis: Any) -> None:
    """The per-layer table of :func:`reparam.quant.analyze_model` and a summary of the flagged layers."""
    from reparam import quant

    table = Table(title=f"int{analysis.bits} weight quantization of the fused model "
                  f"({_plural(len(analysis.layers), 'conv/linear layer')})", title_justify="left")
    for column, justify in (("layer", "left"), ("kind", "left"), ("min", "right"), ("max", "right"),
                            ("max|w|/std", "right"), ("ch. spread", "right"), ("SNR per-tensor dB", "right"),
                            ("worst channel dB", "right"), ("SNR per-channel dB", "right"), ("flag", "left")):
        table.add_column(column, justify=justify)
    for layer in analysis.layers:
        style = "red" if layer.advice == "keep in higher precision" else ("yellow" if layer.flagged else None)
        table.add_row(layer.name, layer.kind, f"{layer.w_min:.3g}", f"{layer.w_max:.3g}", f"{layer.outlier_ratio:.1f}",
                      f"{layer.channel_spread:.1f}", _fmt_db(layer.per_tensor_snr_db),
                      _fmt_db(layer.per_tensor_worst_channel_snr_db), _fmt_db(layer.per_channel_snr_db),
                      layer.advice and f"⚠ {layer.advice}", style=style)
    ui.out.print(table)
    flagged = analysis.flagged
    rule = (f"flagged: per-tensor SNR < {analysis.snr_threshold_db:g} dB, a channel's SNR < "
            f"{analysis.channel_snr_threshold_db:g} dB or max|w|/std > {analysis.outlier_threshold:g}")
    if not flagged:
        ui.out.print(f"quantization: no layer flagged ({rule}); symmetric int{analysis.bits} weights should be fine",
                     highlight=False)
        return
    ui.out.print(f"quantization: {len(flagged)} of {_plural(len(analysis.layers), 'layer')} flagged ({rule})",
                 highlight=False)
    for layer in flagged:
        fix = ("quantize it per channel" if layer.advice == "per-channel"
               else "keep it in float16/float32 or clip its outliers: per-channel quantization is not enough")
        ui.out.print(f"  {layer.name}: {'; '.join(layer.flags)}; with per-channel scales: SNR "
                     f"{_fmt_db(layer.per_channel_snr_db)} dB, worst channel "
                     f"{_fmt_db(layer.per_channel_worst_channel_snr_db)} dB → {fix}", highlight=False, soft_wrap=True)
    ui.out.print("see docs/quantization.md for remedies (per-channel scales, QARepVGG-style training, clipping, "
                 f"mixed precision); thresholds: reparam.quant (SNR_THRESHOLD_DB = {quant.SNR_THRESHOLD_DB:g})",
                 highlight=False)


def _rewrite_cells(rewrite: Any) -> tuple[str, str, str, str]:
    if hasattr(rewrite, "where"):
        events = ", ".join(f"{k} ×{v}" if v > 1 else k for k, v in _tally(getattr(rewrite, "events", ())).items())
        return str(rewrite.where), str(getattr(rewrite, "before", "")), str(getattr(rewrite, "after", "")), events
    kind, description = tuple(rewrite)[:2]  # the (kind, description) form
    return str(description), "", "", str(kind)


def _tally(items: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in list(model.named_children())[:6])
        raise UsageError(f"no submodule {name!r} in the model. Give a dotted module name, e.g. one of: {children}") from None


def _draw_block(loaded: LoadedModel, name: str | None, path: Path) -> tuple[str, str]:
    """Trace one block, fuse it, and draw both graphs; returns (block name, renderer)."""
    from torch import fx

    import reparam
    from reparam import export

    model = loaded.model
    name = name or export.find_branch_block(model)
    if name is None:
        raise UsageError(f"found no multi-branch block in {type(model).__name__} to draw. Name one with --block")
    block = _submodule(model, name)
    seen: list[tuple] = []
    handle = block.register_forward_pre_hook(lambda _m, a: seen.append(a) if not seen else None)
    try:
        with torch.no_grad():
            model(loaded.example)
    finally:
        handle.remove()
    if not seen:
        raise UsageError(f"block {name!r} is not called in the forward pass. Name another one with --block")
    try:
        before = fx.symbolic_trace(block)
    except Exception as exc:
        raise UsageError(f"block {name!r} cannot be traced by torch.fx ({type(exc).__name__}). Name another one with --block") from exc
    after = reparam.fuse(block, seen[0])
    if not isinstance(after, fx.GraphModule):
        after = fx.symbolic_trace(after)
    title = f"{name} ({type(block).__name__})"
    renderer = export.draw_graphs({f"before: {title}": before, "after reparam.fuse": after}, path)
    return name, renderer


# ---------------------------------------------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace, ui: Ui) -> int:
    """``reparam list``: the zoo architectures and the third-party sources."""
    from reparam import models

    table = Table(title="reparam.models architectures (use the name with --arch)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("input")
    table.add_column("classes", justify="right")
    table.add_column("description")
    for name in models.names():
        spec = models.spec(name) if hasattr(models, "spec") else None
        size = ",".join(map(str, spec.input_size)) if spec else ""
        table.add_row(name, size, str(spec.num_classes) if spec else "", spec.description if spec else "")
    ui.out.print(table)
    for prefix, package, how in (("timm:", "timm", "timm.list_models()"),
                                 ("torchvision:", "torchvision", "torchvision.models.list_models()")):
        version = _package_version(package)
        state = f"{package} {version} installed" if version else f"{package} not installed: pip install {package}"
        ui.out.print(f"{prefix}NAME  any {package} model, random init, no download ({state}; names: {how})",
                     highlight=False)
    return EXIT_OK


def _package_version(package: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(package)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------- main


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(lines) <= 1 else f"{text} (more with --debug)"


def _error_line(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code of an exception."""
    message = _one_line(exc)
    if isinstance(exc, io.InputError):
        return message, EXIT_USAGE
    if isinstance(exc, EquivalenceError):
        return message, EXIT_FAILURE
    if isinstance(exc, OSError):  # an I/O failure nothing above turned into an InputError: still not a verification one
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return (f"I/O error{where}: {exc.strerror or message}. Check the path, the free space and the permissions, "
                "or re-run with --debug"), EXIT_USAGE
    if isinstance(exc, ReparamError):
        return f"{message.rstrip('.')}. Re-run with --debug for details", EXIT_FAILURE
    return (f"unexpected {type(exc).__name__}: {message.rstrip('.')}. Re-run with --debug for the traceback "
            "and please report it"), EXIT_FAILURE


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGINT, SIGTERM, SIGHUP) received while a command runs; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: Signals that stop a command the way Ctrl-C does: every temporary file is removed, nothing half-written stays.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Turn :data:`STOP_SIGNALS` into :class:`Interrupted` while the block runs (in the main thread only).

    The first signal raises; later ones are ignored so that the clean-up it triggers runs to its end.  The
    previous handlers are restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``reparam`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    SIGINT, SIGTERM and SIGHUP stop the command cleanly (temporaries removed, no output half-written) with exit
    code 128 + the signal number (130, 143, 129).
    """
    ui = _make_ui()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with _signals_interrupt():
            parser = build_parser()
            try:
                args = parser.parse_args(argv)
            except SystemExit as exit_:  # --help / --version
                return int(exit_.code or 0)
            if getattr(args, "func", None) is None:
                parser.print_help(sys.stderr)
                return EXIT_USAGE
            return args.func(args, ui)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        ui.err.print(f"error: interrupted by {signal.Signals(signum).name}. Temporary files were removed; outputs are "
                     "only ever written whole", highlight=False)
        return 128 + signum
    except Exception as exc:  # every failure ends as one line (and a traceback with --debug)
        if debug:
            traceback.print_exc(file=sys.stderr)
        message, code = _error_line(exc)
        ui.err.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
