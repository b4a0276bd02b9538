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
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from reparam import jsonout, terminal
from reparam.errors import EquivalenceError, InputError, ReparamError, UsageError, one_line
from reparam.lazy import lazy_import
from reparam.packages import package_version

# imported when a command first needs them: `reparam --help` and `reparam list` never load torch
torch = lazy_import("torch")
io = lazy_import("reparam.io")
checkpoints = lazy_import("reparam.checkpoints")
dtypes = lazy_import("reparam.dtypes")
architectures = lazy_import("reparam.architectures")
staging = lazy_import("reparam.staging")
stats = lazy_import("reparam.stats")
yolo = lazy_import("reparam.yolo")
int8_convert = lazy_import("reparam.int8_convert")

__all__ = ["main", "build_parser"]

PROG = "reparam"
DTYPES = ("float32", "float16", "bfloat16")  # --dtype choices, names of torch dtypes
FORMATS = ("pt2", "onnx", "pte", "mlpackage")  # what --out-dir can write
_MOBILE_HINT = "pip install 'reparam[mobile]'"
DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)
LATENCY_WARMUP, LATENCY_REPEATS, LATENCY_BUDGET_S = 2, 9, 4.0  # the speed figure's rounds (see reparam.timing)
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_MORE = " (more with --debug)"  # what an error line adds when it leaves lines of the message out


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
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: expected comma-separated integers like 1,3,224,224"
        ) from None
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: expected a batch size and at least one more "
            "dimension, all positive, like 1,3,224,224"
        )
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
    weights_help = (
        "weights: a torch.save file (.pt/.pth, a plain or wrapped state dict) or .safetensors; an "
        "ultralytics checkpoint (e.g. yolov8n.pt, no --arch needed) or model yaml (e.g. yolov8n.yaml: "
        "random weights)"
    )
    if checkpoint_required:  # convert: one or more checkpoints (several: see --out-dir)
        parser.add_argument(
            "checkpoints",
            nargs="*",
            type=Path,
            metavar="CHECKPOINT",
            help=weights_help + "; several are converted one after the other (with --out-dir); "
            "none: random weights of --arch ultralytics:CFG.yaml",
        )
    else:
        parser.add_argument(
            "checkpoint", nargs="?", type=Path, metavar="CHECKPOINT", help=weights_help + "; omitted: random weights"
        )
    parser.add_argument(
        "--arch",
        metavar="NAME",
        help="architecture: a reparam.models name (see `reparam list`), timm:NAME, torchvision:NAME "
        "or ultralytics:CFG.yaml (required unless CHECKPOINT is an ultralytics checkpoint or yaml)",
    )
    parser.add_argument(
        "--input-shape",
        type=input_shape,
        metavar="N,C,H,W",
        help="example input shape, batch first (default: the architecture's, else 1,3,224,224)",
    )
    parser.add_argument(
        "--num-classes",
        type=positive_int,
        metavar="N",
        help="classifier outputs (default: read from the checkpoint's classifier, else the architecture's)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow a pickle checkpoint to run code while loading (only for files you trust)",
    )
    parser.add_argument("--ema", action="store_true", help="use the EMA weights when the checkpoint has both")
    parser.add_argument(
        "--json",
        type=Path,
        metavar="FILE",
        help="also write everything the command found (rewrites, "
        "refusals, notes, counts, errors, timings) as JSON to FILE, or to stdout with `-` "
        "(schema: docs/report-schema.json)",
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _cost_option(parser: argparse.ArgumentParser) -> None:
    """``--cost``: how a doubtful merge is decided (passed to reparam.fuse as ``cost``)."""
    parser.add_argument(
        "--cost",
        choices=("macs", "latency"),
        default="macs",
        help="decide each doubtful merge (more MACs or more kernels after it) by multiply-accumulates "
        "(macs, default: merge when it costs no more) or by timing both forms on the device in the "
        "deploy dtype (latency; timings cached in $REPARAM_CACHE_DIR, default ~/.cache/reparam)",
    )


def device_name(text: str) -> str:
    """Parse ``cpu``, ``cuda`` or ``cuda:N`` (checked against the machine when the command runs)."""
    if re.fullmatch(r"cpu|cuda(:\d+)?", text.strip().lower()) is None:
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: expected cpu, cuda or cuda:N")
    return text.strip().lower()


def format_list(text: str) -> tuple[str, ...]:
    """Parse ``pt2,onnx`` (the formats --out-dir writes)."""
    names = tuple(dict.fromkeys(n.strip().lower().lstrip(".") for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"invalid format list {text!r}: expected some of {','.join(FORMATS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``reparam`` command."""
    parser = _Parser(
        prog=PROG,
        description="Structural re-parameterization: fuse multi-branch training-time "
        "networks into plain deploy models, exactly.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    convert = commands.add_parser(
        "convert",
        help="fuse a checkpoint into a verified deploy model (.pt2 / .onnx / .pte / .mlpackage)",
        description="Load CHECKPOINT into --arch, fuse it, verify it and write deploy files. "
        "Without -o/--onnx/--pte/--coreml, writes <checkpoint stem>_deploy.pt2 next to the "
        "checkpoint.",
    )
    _model_options(convert, checkpoint_required=True)
    convert.add_argument("-o", "--output", type=Path, metavar="OUT.pt2", help="write a torch.export program here")
    convert.add_argument("--onnx", type=Path, metavar="OUT.onnx", help="write an ONNX model here (dynamic batch axis)")
    convert.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset, 17 or later (default 18)")
    convert.add_argument(
        "--pte",
        type=Path,
        metavar="OUT.pte",
        help="write an ExecuTorch program lowered to XNNPACK "
        f"here, verified in ExecuTorch's runtime (needs {_MOBILE_HINT})",
    )
    convert.add_argument(
        "--coreml",
        type=Path,
        metavar="OUT.mlpackage",
        help="write a Core ML package here "
        f"(conversion only: not run off macOS; needs coremltools, e.g. {_MOBILE_HINT})",
    )
    convert.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="precision of the deploy model and "
        "files (folded in float64, rounded once; default: the model's own). Exported files then take "
        "inputs of this dtype (a Core ML package still takes float32 inputs and computes in float16). "
        "Checked first: a model whose activations overflow the dtype, or that loses too much accuracy "
        "in it, is refused with the module where it happens (see reparam.precision)",
    )
    convert.add_argument(
        "--no-check",
        action="store_true",
        help="report but do not fail on differences between the original, fused and exported models",
    )
    convert.add_argument(
        "--remove-residuals",
        action="store_true",
        help="also merge identity residuals into convolutions where exact (passed to reparam.fuse)",
    )
    convert.add_argument(
        "--force",
        action="store_true",
        help="replace output files that exist already (they are "
        "replaced only once every output is written and verified)",
    )
    convert.add_argument(
        "--out-dir",
        type=Path,
        metavar="DIR",
        help="write each checkpoint's deploy files into DIR "
        "as <checkpoint stem>_deploy.<format> (needed for several checkpoints; one progress bar and "
        "a summary table; a bad file is reported and the others still converted)",
    )
    convert.add_argument(
        "--formats",
        type=format_list,
        default=("pt2",),
        metavar="LIST",
        help=f"with --out-dir: the formats to write, some of {','.join(FORMATS)} (default pt2)",
    )
    convert.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        metavar="DEVICE",
        help="cpu, cuda or cuda:N: "
        "fold (still in float64), verify and time there; the deploy files hold weights for it "
        "(default cpu)",
    )
    convert.add_argument(
        "--no-bench",
        action="store_true",
        help="skip the speed comparison of the original and the fused model (a few seconds)",
    )
    _cost_option(convert)
    int8_convert.add_options(convert)
    convert.set_defaults(func=cmd_convert)

    inspect = commands.add_parser(
        "inspect",
        help="show what will merge, what will not and why",
        description="Explain the branch structure of --arch (with CHECKPOINT's weights, if "
        "given): every merge reparam will do and every merge it refuses, with the reason.",
    )
    _model_options(inspect, checkpoint_required=False)
    inspect.add_argument(
        "--graph",
        type=Path,
        metavar="FILE",
        help="draw one block before and after fusion "
        "(.svg/.png/.pdf with Graphviz or matplotlib; .dot writes Graphviz source)",
    )
    inspect.add_argument("--force", action="store_true", help="replace the --graph or --json file if it exists")
    inspect.add_argument(
        "--block", metavar="NAME", help="the submodule to draw (default: the first multi-branch block)"
    )
    inspect.add_argument(
        "--quant",
        action="store_true",
        help="report how each fused conv/linear layer's weights "
        "survive int8 quantization (range, outliers, per-tensor / per-channel SNR) and flag the "
        "layers that will hurt (see docs/quantization.md)",
    )
    _cost_option(inspect)
    inspect.set_defaults(func=cmd_inspect)

    listing = commands.add_parser(
        "list",
        help="list the available architectures",
        description="List the reparam.models architectures and the timm:/torchvision: sources.",
    )
    listing.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    listing.set_defaults(func=cmd_list)

    explain = commands.add_parser(
        "explain",
        help="say what a rewrite, op or refusal kind of the report means",
        description="Print what KIND (a word of the report: fold_bn, merge_parallel, shift, "
        "no-op, zero-padding ...) means; without KIND, every kind.",
    )
    explain.add_argument("kind", nargs="?", metavar="KIND", help="the word to explain")
    explain.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    explain.set_defaults(func=cmd_explain)
    return parser


def _version() -> str:
    """The installed reparam's version, else (a checkout on PYTHONPATH) the package's own."""
    installed = package_version("reparam")
    if installed is not None:
        return installed
    import reparam  # pragma: no cover - not installed

    return getattr(reparam, "__version__", "unknown")


# ------------------------------------------------------------------------------------------------- helpers


@dataclass
class Ui:
    """Where the command writes: the report (stdout) and progress / errors (stderr).

    Every step's name and duration is kept in ``steps`` (for ``--json``).  With ``progress`` set (a batch of
    checkpoints under one progress bar), a step updates the bar's text instead of printing its own line.
    """

    out: Console
    err: Console
    steps: list = field(default_factory=list)
    progress: Any = None  # (rich Progress, task id) while a batch runs

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        """Show a spinner while a step runs, then a tick and its duration."""
        start = time.perf_counter()
        if self.progress is not None:
            bar, task = self.progress
            bar.update(task, step=text)
            yield
        else:
            with self.err.status(f"{text}…"):
                yield
        seconds = time.perf_counter() - start
        self.steps.append({"name": text, "seconds": round(seconds, 3)})
        if self.progress is None:
            self.err.print(f"[green]✓[/] {text} [dim]({seconds:.1f}s)[/]", highlight=False)


def _make_ui() -> Ui:
    return Ui(out=terminal.make_console(sys.stdout), err=terminal.make_console(sys.stderr, stderr=True))


@dataclass
class LoadedModel:
    """A model ready to fuse, with its example input and where its weights came from."""

    model: torch.nn.Module
    example: torch.Tensor
    source: str
    num_classes: int | None
    arch: str = ""
    weights: Path | None = None  # the file the weights came from (None: random weights)


@dataclass
class Source:
    """Where the model comes from: ``arch`` (``--arch``, ``ultralytics:CFG`` for a yaml given as CHECKPOINT, or
    ``ultralytics`` for an ultralytics checkpoint that names its own), the ``weights`` file (None: random weights),
    and whether ultralytics builds or loads it."""

    arch: str
    weights: Path | None
    ultralytics: bool


_RANDOM = "random weights (no checkpoint)"


def _source(args: argparse.Namespace, weights_required: bool) -> Source:
    """Resolve CHECKPOINT and ``--arch`` (see :class:`Source`); usage errors for what does not fit together."""
    checkpoint, arch = args.checkpoint, args.arch
    if yolo.is_config(checkpoint):  # reparam convert yolov8n.yaml
        if arch is not None:
            raise UsageError(
                f"{checkpoint} is a model config, which replaces --arch. Leave out --arch {arch}, or give "
                f"--arch {yolo.PREFIX}{checkpoint} and a weights file"
            )
        return Source(f"{yolo.PREFIX}{checkpoint}", None, True)
    if arch is None:
        if checkpoint is None:
            raise UsageError(
                "the following arguments are required: --arch (or an ultralytics CHECKPOINT / model "
                "yaml). Pass --arch NAME"
            )
        if not yolo.is_checkpoint(checkpoints.check_checkpoint_path(checkpoint)):
            raise UsageError(
                f"the following arguments are required: --arch ({checkpoint.name} is not an ultralytics "
                "checkpoint, the one kind that names its own architecture). Pass --arch NAME"
            )
        return Source("ultralytics", checkpoint, True)
    is_yolo = arch.startswith(yolo.PREFIX)
    if checkpoint is None and weights_required and not is_yolo:
        raise UsageError("the following arguments are required: CHECKPOINT. Give the weights file to convert")
    return Source(arch, checkpoint, is_yolo)


def _load_model(args: argparse.Namespace, ui: Ui, source: Source | None = None) -> LoadedModel:
    """Read the checkpoint (if any), build the architecture and load the weights strictly."""
    source = source or _source(args, weights_required=False)
    if source.ultralytics:
        model, where, num_classes, arch, imgsz = _load_ultralytics(args, source, ui)
        shape = args.input_shape or yolo.input_size(model, imgsz)
    else:
        model, where, num_classes = _load_weights(args, source, ui)
        arch = source.arch
        shape = args.input_shape or architectures.default_input_shape(arch, model) or DEFAULT_INPUT_SHAPE
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(shape, generator=generator)
    _check_runs(model, example, arch)
    return LoadedModel(model, example, where, num_classes, arch, source.weights)


def _load_weights(args: argparse.Namespace, source: Source, ui: Ui) -> tuple[torch.nn.Module, str, int | None]:
    """(model, where its weights came from, classes): ``source.arch`` built, its weights file loaded strictly."""
    checkpoint = None
    if source.weights is not None:
        with ui.step(f"Reading {source.weights.name}"):
            checkpoint = checkpoints.read_checkpoint(source.weights, trust=args.trust_checkpoint, prefer_ema=args.ema)
    num_classes = args.num_classes
    if num_classes is None and checkpoint is not None and not source.ultralytics:
        num_classes = checkpoints.infer_num_classes(checkpoint.state_dict)
    with ui.step(f"Building {source.arch}"):
        model = architectures.build_model(source.arch, num_classes)
        if checkpoint is not None:
            checkpoints.load_strict(model, checkpoint.state_dict)
    if checkpoint is None:
        return model, _RANDOM, num_classes
    if args.ema and not _has_ema(checkpoint):
        checkpoint.notes.append("no EMA weights in it: used the plain weights")
        ui.err.print(
            f"note: --ema: {source.weights.name} has no EMA weights (none of "
            f"{', '.join(checkpoints.EMA_KEYS)}); using the plain weights",
            highlight=False,
            soft_wrap=True,
        )
    return model, " ".join([checkpoint.source] + [f"({n})" for n in checkpoint.notes]), num_classes


def _load_ultralytics(args: argparse.Namespace, source: Source, ui: Ui):
    """(model prepared for export, where its weights came from, classes, arch, training image size) of an
    ultralytics checkpoint, or of a yaml build with random weights or a weights file loaded strictly."""
    loaded = None
    if source.weights is not None and yolo.is_checkpoint(checkpoints.check_checkpoint_path(source.weights)):
        with ui.step(f"Reading {source.weights.name}"):
            loaded = yolo.load_checkpoint(source.weights, trust=args.trust_checkpoint)
    if source.arch == "ultralytics":  # the checkpoint's own model
        model, arch = loaded.model, _config_name(loaded.model)
        if args.num_classes is not None and args.num_classes != yolo.num_classes(model):
            raise UsageError(
                f"--num-classes {args.num_classes} does not match the checkpoint's model, which has "
                f"{yolo.num_classes(model)} classes. Leave out --num-classes"
            )
        where = loaded.source
    elif loaded is not None:  # --arch ultralytics:CFG and an ultralytics checkpoint: its weights, strictly
        with ui.step(f"Building {source.arch}"):
            model = architectures.build_model(source.arch, args.num_classes or yolo.num_classes(loaded.model))
            checkpoints.load_strict(model, loaded.model.state_dict())
        arch, where = source.arch, loaded.source
    else:
        model, where, _ = _load_weights(args, source, ui)
        arch = source.arch
    return yolo.prepare(model), where, yolo.num_classes(model), arch, loaded.imgsz if loaded else None


def _config_name(model: torch.nn.Module) -> str:
    """``ultralytics:<yaml>`` for a loaded ultralytics model (the yaml it was built from, when recorded)."""
    spec = getattr(model, "yaml", None)
    name = spec.get("yaml_file") if isinstance(spec, dict) else None
    return f"{yolo.PREFIX}{Path(name).name}" if name else f"{yolo.PREFIX}{type(model).__name__}"


def _has_ema(checkpoint: checkpoints.Checkpoint) -> bool:
    """Whether the weights were read from one of the checkpoint's EMA entries."""
    return any(f"[{key!r}]" in checkpoint.source for key in checkpoints.EMA_KEYS)


def _check_runs(model: torch.nn.Module, example: torch.Tensor, arch: str) -> None:
    """Run the model once so that an input it cannot take is reported as bad input, not as a fusion failure."""
    from reparam import shapes

    shape = ",".join(map(str, example.shape))
    try:
        shapes.run_checked(model, example)
    except shapes.InputShapeError as exc:
        raise shapes.InputShapeError(
            f"{arch} cannot run on an input of shape {shape}: {exc.reason}. Pass "
            f"--input-shape {','.join(exc.layout)} with numbers, e.g. "
            f"{_example_shape(exc.layout, example.shape)}",
            exc.shape,
            exc.reason,
            exc.layout,
        ) from exc
    except Exception as exc:
        raise UsageError(
            f"{arch} cannot run on an input of shape {shape} ({type(exc).__name__}: "
            f"{one_line(exc, _MORE)}). Pass the right --input-shape"
        ) from exc


def _example_shape(layout: tuple[str, ...], given: Sequence[int]) -> str:
    """``layout`` (``N, 1, H, W``) filled in: the given batch (when the rank fits) and trailing sizes, else 1 and
    224."""
    spatial = len(layout) - 2
    sizes = list(given[len(given) - spatial :]) if 0 < spatial <= len(given) else [224] * spatial
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


def _speedup(ratio: float) -> str:
    """``2.10× faster`` for a ratio original / fused of 2.1 (``slower`` below 1)."""
    if ratio <= 0:
        return ""
    return f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"


# ------------------------------------------------------------------------------------------------- convert


@dataclass
class Measures:
    """What the report compares between the original and the fused model."""

    params: int
    macs: int
    kernels: dict[str, int]


def _measure(model: torch.nn.Module, example: torch.Tensor) -> Measures:
    """Parameters, MACs and executed kernels of ``model`` on ``example``."""
    return Measures(
        params=stats.count_params(model),
        macs=stats.count_macs(model, example),
        kernels=stats.count_kernels(model, example),
    )


def _bench(original: torch.nn.Module, fused: torch.nn.Module, example: torch.Tensor) -> Any:
    """The speed figure (:mod:`reparam.timing`): interleaved rounds after warm-up, one CPU thread."""
    from reparam import timing

    return timing.compare(
        original, fused, example, rounds=LATENCY_REPEATS, warmup=LATENCY_WARMUP, budget_s=LATENCY_BUDGET_S
    )


def _check_device(name: str) -> None:
    """Refuse a CUDA device this machine does not have (exit 2)."""
    if not name.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU found"
        raise UsageError(
            f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}, "
            f"{built}). Use --device cpu"
        )
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise UsageError(
            f"--device {name}: this machine has {_plural(torch.cuda.device_count(), 'CUDA device')} "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}). Choose one of them"
        )


@dataclass
class Outputs:
    """The files ``convert`` writes (None: not requested)."""

    pt2: Path | None = None
    onnx: Path | None = None
    pte: Path | None = None
    coreml: Path | None = None


_SUFFIX_OPTIONS = {".onnx": "--onnx", ".pte": "--pte", ".mlpackage": "--coreml"}


def _default_output(source: Source) -> Path:
    """``<weights stem>_deploy.pt2`` next to the weights, else ``<config stem>_deploy.pt2`` here."""
    if source.weights is not None:
        return source.weights.with_name(f"{source.weights.stem}_deploy.pt2")
    return Path(f"{Path(source.arch.partition(':')[2] or source.arch).stem}_deploy.pt2")


def _outputs(args: argparse.Namespace, source: Source) -> Outputs:
    """The paths to write, validated before any work is done."""
    pt2, onnx_path = args.output, args.onnx
    pte, coreml = getattr(args, "pte", None), getattr(args, "coreml", None)
    if pt2 is not None and pt2.suffix.lower() in _SUFFIX_OPTIONS:
        option = _SUFFIX_OPTIONS[pt2.suffix.lower()]
        what = {".onnx": "ONNX", ".pte": "an ExecuTorch program", ".mlpackage": "a Core ML package"}[pt2.suffix.lower()]
        raise UsageError(f"-o writes a torch.export program, not {what} ({pt2}). Use {option} {pt2} for that")
    if pte is not None and pte.suffix.lower() != ".pte":
        raise UsageError(
            f"--pte writes an ExecuTorch program, whose file name ends in .pte ({pte}). "
            f"Name it {pte.with_suffix('.pte').name}"
        )
    if coreml is not None and coreml.suffix.lower() != ".mlpackage":
        raise UsageError(
            f"--coreml writes a Core ML package, a directory whose name ends in .mlpackage ({coreml}). "
            f"Name it {coreml.with_suffix('.mlpackage').name}"
        )
    derived = pt2 is None and onnx_path is None and pte is None and coreml is None
    if derived:  # reparam's own choice of name: rerunning the same command replaces it, with a notice
        pt2 = _default_output(source)
    if args.opset is not None and onnx_path is None:
        raise UsageError("--opset only applies to ONNX output. Add --onnx OUT.onnx")
    named = [
        (flag, path)
        for flag, path in (("-o", pt2), ("--onnx", onnx_path), ("--pte", pte), ("--coreml", coreml))
        if path is not None
    ]
    for i, (flag_a, a) in enumerate(named):
        for flag_b, b in named[i + 1 :]:
            if io.same_file(a, b):
                raise UsageError(f"{flag_a} and {flag_b} name the same file {a}. Give them different names")
    inputs = [source.weights] if source.weights is not None else []
    for flag, path in named:
        if flag == "--coreml" and path.is_dir() and not path.is_symlink():
            if not (path / "Manifest.json").is_file():
                raise UsageError(f"output {path} is a directory but not a Core ML package. Choose another name")
            io.check_output_path(path.parent / f"{path.name}.new", inputs=inputs)  # replaced when done
            continue
        io.check_output_path(path, inputs=inputs)
    _refuse_existing([] if derived else named, args.force)
    return Outputs(pt2, onnx_path, pte, coreml)


def _refuse_existing(named: Sequence[tuple[str, Path]], force: bool) -> None:
    """Without ``--force``, an output that exists already is a usage error (nothing is replaced by surprise)."""
    for flag, path in named:
        if not force and (path.exists() or path.is_symlink()):
            raise UsageError(
                f"{flag} {path} exists already. Pass --force to replace it (replaced only once every "
                "output is written and verified), or choose another path"
            )


def _check_dtype(args: argparse.Namespace, outputs: Outputs) -> torch.dtype | None:
    """The ``--dtype`` asked for, after refusing the output formats that cannot hold it."""
    if args.dtype is None:
        return None
    dtype = getattr(torch, args.dtype)
    if dtype == torch.bfloat16 and outputs.onnx is not None:
        raise UsageError(
            "ONNX has no bfloat16 convolution, so ONNX Runtime cannot run a bfloat16 model. "
            "Use --dtype float16 for --onnx, or leave out --onnx"
        )
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
    """``reparam convert``: load, fuse, verify, export, report; several checkpoints with ``--out-dir``."""
    from reparam import export

    if args.opset is not None and args.opset < export.MIN_OPSET:
        raise UsageError(
            f"ONNX opset {args.opset} is too old. Use --opset {export.MIN_OPSET} or later "
            f"(default {export.DEFAULT_OPSET})"
        )
    if args.out_dir is None and len(args.checkpoints) > 1:
        raise UsageError(
            f"{len(args.checkpoints)} checkpoints given: several are converted into a directory. Add --out-dir DIR"
        )
    if args.out_dir is None and args.formats != ("pt2",):
        raise UsageError("--formats chooses what --out-dir writes. Add --out-dir DIR, or use -o/--onnx/--pte/--coreml")
    _check_json_path(args, ui)
    _check_device(args.device)
    if args.out_dir is not None:
        if not args.checkpoints:
            raise UsageError("--out-dir converts the CHECKPOINT files given: name at least one")
        from reparam import batch

        return batch.convert_all(args, ui, _convert_one)
    args.checkpoint = args.checkpoints[0] if args.checkpoints else None
    with _json_results(args, "convert") as results:
        results.append(_convert_one(args, ui))
    return EXIT_OK


def _check_json_path(args: argparse.Namespace, ui: Ui) -> None:
    """Refuse an unwritable or (without --force) existing --json file before any work; with ``--json -`` the
    human-readable report goes to stderr, so that stdout is the JSON document alone."""
    if args.json is not None and str(args.json) == "-":
        ui.out = ui.err
    if args.json is None or str(args.json) == "-":
        return
    inputs = [c for c in (getattr(args, "checkpoints", None) or [getattr(args, "checkpoint", None)]) if c is not None]
    io.check_output_path(args.json, inputs=inputs)
    _refuse_existing([("--json", args.json)], args.force)


@contextmanager
def _json_results(args: argparse.Namespace, command: str) -> Iterator[list]:
    """Collect the command's result entries; write the ``--json`` document at the end, a failure included."""
    results: list[dict] = []
    if args.json is None:
        yield results
        return
    try:
        yield results
    except Exception as exc:
        message, code = _error_line(exc)
        entry = getattr(exc, "reparam_result", None) or (results[-1] if results else None)
        if entry is None:
            entry = jsonout.new_result(command, args.arch, getattr(args, "checkpoint", None))
            results.append(entry)
        elif entry not in results:
            results.append(entry)
        entry.update(status="failed", error=message, exit_code=code)
        jsonout.write(args.json, jsonout.document(command, results, code))
        raise
    for entry in results:
        entry.update(status="ok", exit_code=EXIT_OK)
    jsonout.write(args.json, jsonout.document(command, results, EXIT_OK))


def _convert_one(args: argparse.Namespace, ui: Ui, print_report: bool = True) -> dict:
    """Convert ``args.checkpoint`` into the outputs ``args`` names; returns its ``--json`` result entry.

    An exception leaves with the entry filled in so far as its ``reparam_result`` attribute.
    """
    entry = jsonout.new_result("convert", args.arch, args.checkpoint, args.device)
    first_step = len(ui.steps)
    try:
        _convert_into(args, ui, entry, print_report)
    except Exception as exc:
        exc.reparam_result = entry
        raise
    finally:
        entry["steps"] = ui.steps[first_step:]
    entry["status"], entry["exit_code"] = "ok", EXIT_OK
    return entry


def _convert_into(args: argparse.Namespace, ui: Ui, entry: dict, print_report: bool) -> None:
    from reparam import export

    if args.checkpoint is not None and not yolo.is_config(args.checkpoint):
        checkpoints.check_checkpoint_path(args.checkpoint)
    source = _source(args, weights_required=True)
    entry["checkpoint_size"] = source.weights.stat().st_size if source.weights is not None else None
    outputs = _outputs(args, source)
    int8_convert.check_options(args, outputs.onnx is not None, outputs.pte is not None)
    dtype = _check_dtype(args, outputs)
    _require_mobile_packages(outputs)
    loaded = _load_model(args, ui, source)
    if args.device != "cpu":
        with ui.step(f"Moving the model to {args.device}"):
            loaded.model.to(args.device)
            loaded.example = loaded.example.to(args.device)
    model, example = loaded.model, loaded.example
    entry.update(weights=loaded.source, input_shape=list(example.shape))
    check = not args.no_check

    options: dict[str, Any] = {"check": check, "remove_residuals": args.remove_residuals}
    if args.equalize:
        options["equalize"] = True
    if getattr(args, "cost", "macs") != "macs":
        options["cost"] = args.cost
    calibration = int8_convert.load_calibration(args, model, tuple(example.shape)) if args.int8 else None
    if dtype is not None:
        options["dtype"] = dtype
    if dtype is not None and dtype != example.dtype:
        from reparam import precision

        with ui.step(f"Checking that the model's activations fit {args.dtype}"):
            precision.check_precision(model, example, dtype)
    with ui.step("Fusing" if dtype is None else f"Fusing (deploy precision {args.dtype})"):
        fused = _fuse(model, example, **options)
    report = getattr(fused, "reparam_report", None)
    if report is not None and hasattr(report, "to_dict"):
        entry["report"] = report.to_dict()
    deploy_dtype = dtypes.floating_dtype(fused) or example.dtype
    deploy_example = example.to(deploy_dtype)
    # the original keeps its own dtype: give it the deploy inputs cast back, and compare in float64
    original = model if deploy_dtype == example.dtype else _cast_inputs(model, example.dtype)
    runnable = fused if deploy_dtype == example.dtype else _cast_inputs(fused, deploy_dtype)
    with ui.step("Counting parameters, MACs and kernels"):
        before, after = _measure(model, example), _measure(runnable, example)
        with torch.no_grad():
            fused_error = stats.relative_error(fused(deploy_example), model(example))
    entry["measures"] = {"before": jsonout.measures_entry(before), "after": jsonout.measures_entry(after)}
    entry["errors"] = {"fused": fused_error}
    speed = None
    if not args.no_bench:
        with ui.step("Timing original vs fused (interleaved, 1 thread; skip with --no-bench)"):
            speed = _bench(model, runnable, example)
        entry["speed"] = speed.to_dict()

    results = []
    with staging.Staging() as stage:  # every file is written and verified beside its target, then all move in
        if outputs.pt2 is not None or outputs.onnx is not None:
            with ui.step("Tracing with torch.export"):
                program = export.export_program(fused, deploy_example)
        if outputs.pt2 is not None:
            with ui.step(f"Writing and verifying {outputs.pt2.name}"):
                results.append(
                    export.export_pt2(
                        fused, deploy_example, stage.path(outputs.pt2), original=original, program=program, check=check
                    )
                )
        if outputs.onnx is not None and not args.int8:
            with ui.step(f"Writing and verifying {outputs.onnx.name} in ONNX Runtime"):
                results.append(
                    export.export_onnx(
                        fused,
                        deploy_example,
                        stage.path(outputs.onnx),
                        args.opset or export.DEFAULT_OPSET,
                        original=original,
                        program=program,
                        check=check,
                    )
                )
        if args.int8:
            results += int8_convert.write(fused, model, calibration, args, stage, ui, outputs.onnx, outputs.pte)
        if outputs.pte is not None and not args.int8:
            from reparam import mobile

            with ui.step(f"Lowering to ExecuTorch (XNNPACK), writing and verifying {outputs.pte.name}"):
                results.append(
                    mobile.export_pte(fused, deploy_example, stage.path(outputs.pte), original=original, check=check)
                )
        if outputs.coreml is not None:
            from reparam import mobile

            with ui.step(f"Converting to Core ML, writing {outputs.coreml.name}"):
                results.append(mobile.export_coreml(fused, example, stage.path(outputs.coreml), precision=deploy_dtype))
        targets = [path for path in (outputs.pt2, outputs.onnx, outputs.pte, outputs.coreml) if path is not None]
        replaced = stage.commit()
    for result, target in zip(results, targets, strict=True):
        result.path = target
    entry["outputs"] = [jsonout.export_entry(r) for r in results]
    for result in results:
        if result.errors:
            entry["errors"][_RUN_LABELS.get(result.format, f".{result.format}")] = result.errors.get("original", 0.0)
    for path in replaced:
        why = "--force" if args.force else "the default output (name one with -o to keep both)"
        ui.err.print(f"note: {why}: replaced the existing {path}", highlight=False, soft_wrap=True)
    if print_report:
        _print_convert_report(ui, args, loaded, before, after, fused_error, results, report, speed)
        int8_convert.print_report(ui, results, fused)


def _cast_inputs(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    from reparam.modules import CastInputs

    return CastInputs(model, dtype)


def _print_convert_report(
    ui, args, loaded, before: Measures, after: Measures, fused_error: float, results, report, speed: Any = None
) -> None:
    weights = loaded.weights.name if loaded.weights is not None else "random weights"
    table = terminal.table(
        f"{loaded.arch}: {weights} → deploy", "", ("before", "right"), ("after", "right"), ("change", "right")
    )
    table.columns[0].style = "bold"
    table.add_row(
        "parameters", _fmt_count(before.params), _fmt_count(after.params), _change(before.params, after.params)
    )
    table.add_row("MACs", _fmt_count(before.macs), _fmt_count(after.macs), _change(before.macs, after.macs))
    for key, label in _KERNEL_LABELS:
        b, a = before.kernels[key], after.kernels[key]
        table.add_row(f"{label}s run", str(b), str(a), _change(b, a))
    ckpt_size = loaded.weights.stat().st_size if loaded.weights is not None else None
    if ckpt_size is not None:
        table.add_row("checkpoint file", _fmt_bytes(ckpt_size), "", "")
    for result in results:  # each written file against the checkpoint it came from
        change = _change(ckpt_size, result.size) if ckpt_size is not None else ""
        table.add_row(f"file size (.{result.format})", "", _fmt_bytes(result.size), change)
    if speed is not None:
        table.add_row(
            f"latency, input {','.join(map(str, loaded.example.shape))}",
            f"{speed.before_ms:.2f} ms",
            f"{speed.after_ms:.2f} ms",
            _speedup(speed.ratio),
        )
    table.add_section()  # errors: relative L2 vs the original model on the example input (and another batch size)
    table.add_row("rel. error, fused model", "", f"{fused_error:.1e}", "")
    for result in results:
        if not result.errors:  # not run (Core ML off macOS)
            continue
        where = _RUN_LABELS.get(result.format, f".{result.format}")
        table.add_row(f"rel. error, {where}", "", f"{result.errors.get('original', 0.0):.1e}", "")
    ui.out.print(table)
    say = lambda text: terminal.paragraph(ui.out, text)  # noqa: E731
    if speed is not None:
        threads = f"{_plural(speed.threads, 'thread')}, " if speed.threads else ""
        say(
            f"speed: {speed.text()} on {speed.device} ({threads}{speed.passes} passes per run, interleaved after "
            "warm-up; --no-bench skips it)"
        )
        if speed.warning():
            say(f"note: {speed.warning()}")
    say(f"weights: {loaded.source}; classes: {loaded.num_classes or 'architecture default'}")
    if report is not None and getattr(report, "rewrites", None) is not None:
        counts = report.counts() if hasattr(report, "counts") else {}
        detail = ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))
        say(
            f"rewrites: {len(report.rewrites)} regions ({detail or 'none'}); refused: {len(report.refusals)} "
            "(see `reparam inspect`)"
        )
        decisions = getattr(report, "decisions", ())
        if decisions:
            say(
                f"cost decisions: {len(decisions)} doubtful merges weighed, {sum(d.merged for d in decisions)} "
                f"merged (--cost {getattr(args, 'cost', 'macs')}; `reparam inspect` lists them)"
            )
        _print_legend(ui, report.rewrites, (), groups=("rewrite",))
    if getattr(args, "dtype", None) is not None:
        say(
            f"precision: {args.dtype} (folded in float64, rounded once; errors are against the "
            f"{dtypes.dtype_name(loaded.example.dtype)} original)"
        )
    if args.no_check:
        ui.out.print("[yellow]--no-check: differences were reported, not enforced[/]")
    for result in results:
        say(f"wrote {result.path} ({', '.join(_output_details(result))})")


def _output_details(result: Any) -> list[str]:
    """What the ``wrote FILE (...)`` line says about one written file."""
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
    return details


# ------------------------------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace, ui: Ui) -> int:
    """``reparam inspect``: explain what will merge and what will not, optionally draw a block."""
    from reparam import drawing

    if args.graph is not None:
        io.check_output_path(args.graph, inputs=[args.checkpoint] if args.checkpoint else [])
        _refuse_existing([("--graph", args.graph)], args.force)
        drawing.graph_renderer(args.graph)
    elif args.block is not None:
        raise UsageError("--block chooses the block to draw. Add --graph FILE.svg")
    _check_json_path(args, ui)
    with _json_results(args, "inspect") as results:
        entry = jsonout.new_result("inspect", args.arch, args.checkpoint)
        results.append(entry)
        _inspect_into(args, ui, entry)
        entry["steps"] = list(ui.steps)
    return EXIT_OK


def _inspect_into(args: argparse.Namespace, ui: Ui, entry: dict) -> None:
    import reparam

    if args.checkpoint is not None and not yolo.is_config(args.checkpoint):
        entry["checkpoint_size"] = checkpoints.check_checkpoint_path(args.checkpoint).stat().st_size
    loaded = _load_model(args, ui)
    entry.update(weights=loaded.source, input_shape=list(loaded.example.shape))
    if args.block is not None:
        _submodule(loaded.model, args.block)
    with ui.step("Analysing"):
        kernels = stats.count_kernels(loaded.model, loaded.example)
        report = reparam.explain(loaded.model, (loaded.example,), cost=getattr(args, "cost", "macs"))
    if hasattr(report, "to_dict"):
        entry["report"] = report.to_dict()
    entry["measures"] = {"before": {"kernels": {k: int(v) for k, v in kernels.items()}}}
    _print_inspect_report(ui, args, loaded, kernels, report)
    if getattr(args, "quant", False):
        from reparam import quant

        with ui.step("Fusing and analysing weight quantization"):
            fused = reparam.fuse(loaded.model, (loaded.example,), cost=getattr(args, "cost", "macs"))
            analysis = quant.analyze_model(fused)
        entry["quant"] = [
            {"layer": layer.name, "kind": layer.kind, "flags": list(layer.flags), "advice": layer.advice or None}
            for layer in analysis.layers
        ]
        _print_quant_report(ui, analysis)
    if args.graph is not None:
        with ui.step(f"Drawing {args.graph.name}"):
            block, renderer = _draw_block(loaded, args.block, args.graph)
        terminal.paragraph(ui.out, f"drew {block} before and after into {args.graph} ({renderer})")


def _print_inspect_report(ui: Ui, args, loaded: LoadedModel, kernels: dict, report: Any) -> None:
    say = lambda text: terminal.paragraph(ui.out, text)  # noqa: E731
    say(f"{loaded.arch} — weights: {loaded.source}; input {','.join(map(str, loaded.example.shape))}")
    say("executes: " + ", ".join(_plural(kernels[key], label) for key, label in _KERNEL_LABELS))
    rewrites, refusals = getattr(report, "rewrites", None), getattr(report, "refusals", None)
    if rewrites is None or refusals is None:  # an unknown report type: its own text is the best we have
        ui.out.print(str(report))
        return
    merges = terminal.table(f"will merge ({len(rewrites)} regions)", "where", "before", "after", "rewrites")
    for rewrite in rewrites:
        merges.add_row(*_rewrite_cells(rewrite))
    ui.out.print(merges)
    if not refusals:
        ui.out.print("will not merge: nothing refused", highlight=False)
    else:
        refused = terminal.table(f"will not merge ({len(refusals)})", "where", "why")
        for refusal in refusals:
            where, reason = (refusal.where, refusal.reason) if hasattr(refusal, "reason") else tuple(refusal)[:2]
            refused.add_row(str(where), str(reason))
        ui.out.print(refused)
    _print_decisions(ui, getattr(report, "decisions", ()))
    for note in getattr(report, "notes", []):
        say(f"note: {note}")
    _print_legend(ui, rewrites, refusals)


def _print_decisions(ui: Ui, decisions: Sequence) -> None:
    """The merges the cost model weighed: kernels, MACs, both measured times (with --cost latency), the choice."""
    if not decisions:
        return
    table = terminal.table(f"cost decisions ({len(decisions)})", "where", "kind", "kernels", "MACs", "time", "chosen")
    for d in decisions:
        timed = d.before_s is not None and d.after_s is not None
        table.add_row(
            d.where,
            d.kind,
            f"{d.before_kernels} -> {d.after_kernels}",
            f"{_fmt_count(d.before_macs)} -> {_fmt_count(d.after_macs)}",
            f"{d.before_s * 1e3:.3g} -> {d.after_s * 1e3:.3g} ms" if timed else "not timed",
            "merged" if d.merged else "kept",
        )
    ui.out.print(table)


def _print_legend(
    ui: Ui, rewrites: Sequence, refusals: Sequence, groups: Sequence[str] = ("rewrite", "op", "refusal")
) -> None:
    """Each kind of rewrite, op and refusal (of ``groups``) the report above uses, explained once."""
    from reparam import glossary

    kinds = [k for k in glossary.legend_kinds(rewrites, refusals) if glossary.GLOSSARY[k].group in groups]
    if not kinds:
        return
    ui.out.print("what the words mean (more: `reparam explain KIND`):", highlight=False)
    for kind in kinds:
        terminal.paragraph(ui.out, f"  {kind}: {glossary.GLOSSARY[kind].meaning}", indent="      ")


def _fmt_db(value: float) -> str:
    return "exact" if value == float("inf") else f"{value:.1f}"


def _print_quant_report(ui: Ui, analysis: Any) -> None:
    """The per-layer table of :func:`reparam.quant.analyze_model` and a summary of the flagged layers."""
    from reparam import quant

    table = terminal.table(
        f"int{analysis.bits} weight quantization of the fused model "
        f"({_plural(len(analysis.layers), 'conv/linear layer')}; SNR in dB, ⚠ flagged)",
        "layer",
        "kind",
        ("max\n|w|", "right"),
        ("max|w|\n/std", "right"),
        ("channel\nspread", "right"),
        ("SNR per\ntensor", "right"),
        ("worst\nchannel", "right"),
        ("SNR per\nchannel", "right"),
        "",
        compact=True,
    )
    for column in table.columns[2:]:  # numbers are never folded; the layer names give way first
        column.no_wrap = True
    for layer in analysis.layers:
        style = "red" if layer.advice == "keep in higher precision" else ("yellow" if layer.flagged else None)
        table.add_row(
            layer.name,
            layer.kind,
            f"{max(abs(layer.w_min), abs(layer.w_max)):.3g}",
            f"{layer.outlier_ratio:.1f}",
            f"{layer.channel_spread:.1f}",
            _fmt_db(layer.per_tensor_snr_db),
            _fmt_db(layer.per_tensor_worst_channel_snr_db),
            _fmt_db(layer.per_channel_snr_db),
            "⚠" if layer.advice else "",
            style=style,
        )  # the advice: in the lines below the table
    ui.out.print(table)
    flagged = analysis.flagged
    rule = (
        f"flagged: per-tensor SNR < {analysis.snr_threshold_db:g} dB, a channel's SNR < "
        f"{analysis.channel_snr_threshold_db:g} dB or max|w|/std > {analysis.outlier_threshold:g}"
    )
    if not flagged:
        terminal.paragraph(
            ui.out, f"quantization: no layer flagged ({rule}); symmetric int{analysis.bits} weights should be fine"
        )
        return
    terminal.paragraph(
        ui.out, f"quantization: {len(flagged)} of {_plural(len(analysis.layers), 'layer')} flagged ({rule})"
    )
    for layer in flagged:
        fix = (
            "quantize it per channel"
            if layer.advice == "per-channel"
            else "keep it in float16/float32 or clip its outliers: per-channel quantization is not enough"
        )
        terminal.paragraph(
            ui.out,
            f"  {layer.name}: {'; '.join(layer.flags)}; with per-channel scales: SNR "
            f"{_fmt_db(layer.per_channel_snr_db)} dB, worst channel "
            f"{_fmt_db(layer.per_channel_worst_channel_snr_db)} dB → {fix}",
            indent="    ",
        )
    terminal.paragraph(
        ui.out,
        "see docs/quantization.md for remedies (per-channel scales, QARepVGG-style training, "
        f"clipping, mixed precision); thresholds: reparam.quant (SNR_THRESHOLD_DB = "
        f"{quant.SNR_THRESHOLD_DB:g})",
    )


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
        raise UsageError(
            f"no submodule {name!r} in the model. Give a dotted module name, e.g. one of: {children}"
        ) from None


def _draw_block(loaded: LoadedModel, name: str | None, path: Path) -> tuple[str, str]:
    """Trace one block, fuse it, and draw both graphs; returns (block name, renderer)."""
    from torch import fx

    import reparam
    from reparam import drawing

    model = loaded.model
    name = name or drawing.find_branch_block(model)
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
        raise UsageError(
            f"block {name!r} cannot be traced by torch.fx ({type(exc).__name__}). Name another one with --block"
        ) from exc
    after = reparam.fuse(block, seen[0])
    if not isinstance(after, fx.GraphModule):
        after = fx.symbolic_trace(after)
    title = f"{name} ({type(block).__name__})"
    renderer = drawing.draw_graphs({f"before: {title}": before, "after reparam.fuse": after}, path)
    return name, renderer


# ---------------------------------------------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace, ui: Ui) -> int:
    """``reparam list``: the zoo architectures and the third-party sources, as plain wrapped lines (no torch)."""
    from reparam import catalog

    archs = catalog.ARCHITECTURES
    name_width = max(len(a.name) for a in archs)
    size_width = max(len(",".join(map(str, a.input_size))) for a in archs)
    ui.out.print(
        "reparam.models architectures (use the name with --arch; input C,H,W; default classes):",
        highlight=False,
        markup=False,
    )
    for arch in archs:
        size = ",".join(map(str, arch.input_size))
        head = f"  {arch.name:<{name_width}}  {size:<{size_width}}  {arch.num_classes:>4}  "
        lines = terminal.wrap(arch.description, ui.out.width - len(head), indent="")
        ui.out.print(head + lines[0], highlight=False, markup=False, soft_wrap=True)
        for line in lines[1:]:
            ui.out.print(" " * len(head) + line, highlight=False, markup=False, soft_wrap=True)
    ui.out.print("", highlight=False)
    for prefix, package, how in (
        ("timm:", "timm", "timm.list_models()"),
        ("torchvision:", "torchvision", "torchvision.models.list_models()"),
        ("ultralytics:", "ultralytics", "the yamls in ultralytics/cfg/models, e.g. yolov8n.yaml"),
    ):
        version = package_version(package)
        state = f"{package} {version} installed" if version else f"{package} not installed: pip install {package}"
        terminal.paragraph(
            ui.out,
            f"{prefix}NAME  any {package} model, random init, no download ({state}; names: {how})",
            indent="    ",
        )
    return EXIT_OK


def cmd_explain(args: argparse.Namespace, ui: Ui) -> int:
    """``reparam explain [KIND]``: what a word of the report means (every word without KIND)."""
    from reparam import glossary

    if args.kind is None:
        for group, title in (
            ("rewrite", "rewrite kinds"),
            ("op", "what a region held (the before column)"),
            ("refusal", "kinds of refusal (the why column)"),
        ):
            ui.out.print(f"{title}:", highlight=False, markup=False)
            for name, entry in glossary.GLOSSARY.items():
                if entry.group == group:
                    terminal.paragraph(ui.out, f"  {name}: {entry.meaning}", indent="      ")
        return EXIT_OK
    entry = glossary.lookup(args.kind)
    if entry is None:
        known = ", ".join(glossary.GLOSSARY)
        raise UsageError(f"unknown kind {args.kind!r}. Known kinds: {known}")
    terminal.paragraph(ui.out, f"{args.kind} ({entry.group}): {entry.meaning}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- main


def _error_line(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code of an exception."""
    message = one_line(exc, _MORE)
    if isinstance(exc, InputError):
        return message, EXIT_USAGE
    if isinstance(exc, EquivalenceError):
        return message, EXIT_FAILURE
    if isinstance(exc, OSError):  # an I/O failure nothing above turned into an InputError: still not a verification one
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return (
            f"I/O error{where}: {exc.strerror or message}. Check the path, the free space and the permissions, "
            "or re-run with --debug"
        ), EXIT_USAGE
    if isinstance(exc, ReparamError):
        return f"{message.rstrip('.')}. Re-run with --debug for details", EXIT_FAILURE
    return (
        f"unexpected {type(exc).__name__}: {message.rstrip('.')}. Re-run with --debug for the traceback "
        "and please report it"
    ), EXIT_FAILURE


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
        ui.err.print(
            f"error: interrupted by {signal.Signals(signum).name}. Temporary files were removed; outputs are "
            "only ever written whole",
            highlight=False,
        )
        return 128 + signum
    except Exception as exc:  # noqa: BLE001  the command's boundary: every failure ends as its one-line message
        if debug:  # (with its exit code, and a traceback with --debug)
            traceback.print_exc(file=sys.stderr)
        message, code = _error_line(exc)
        ui.err.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
