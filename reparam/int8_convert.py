"""``reparam convert ... --int8``: the command-line options of int8 deployment and what they do.

``--int8`` makes ``--pte`` / ``--onnx`` int8 programs (:mod:`reparam.int8`) calibrated on ``--calib DIR`` (images),
``--calib FILE.npy`` (a preprocessed ``(N, C, H, W)`` array) or ``--calib-random N`` (a smoke test; :mod:`reparam.
calib`); ``--per-tensor`` uses one weight scale per tensor instead of per channel; ``--equalize`` applies
cross-layer equalization to the fused model first (:mod:`reparam.equalization`; also without ``--int8``).
``--mean`` / ``--std`` / ``--input-size`` set the image preprocessing where the model's timm ``pretrained_cfg``
does not.  The int8 programs are compared with the float fused model on (up to :data:`EVAL_SAMPLES` of) the
calibration inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import InputError
from .lazy import lazy_import

calib = lazy_import("reparam.calib")  # torch and numpy: only once a conversion runs, not for `--help`

__all__ = ["EVAL_SAMPLES", "add_options", "check_options", "load_calibration", "write", "print_report"]

#: The int8 programs are compared with the float model on at most this many calibration inputs.
EVAL_SAMPLES = 256


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.485,0.456,0.406, got {text!r}"
        ) from None


def _size(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected H or H,W (positive integers), got {text!r}")
    return sizes


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of samples, got {text!r}")
    return int(text)


def add_options(parser: argparse.ArgumentParser) -> None:
    """The int8 / equalization options of ``reparam convert``."""
    group = parser.add_argument_group("int8 deployment (docs/quantization.md)")
    group.add_argument(
        "--equalize",
        action="store_true",
        help="cross-layer equalization of the fused model (exact, "
        "verified in float64): balances per-channel weight ranges for int8",
    )
    group.add_argument(
        "--int8",
        action="store_true",
        help="write --pte / --onnx as int8 programs (post-training "
        "static quantization, calibrated with --calib or --calib-random)",
    )
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--calib",
        type=Path,
        metavar="DIR|FILE.npy",
        help="calibration inputs: a folder of images or a preprocessed (N,C,H,W) .npy array",
    )
    source.add_argument(
        "--calib-random",
        type=_count,
        metavar="N",
        help="N random calibration inputs: a smoke test, not an accuracy measurement",
    )
    group.add_argument(
        "--per-tensor",
        action="store_true",
        help="one int8 scale per weight tensor (default: per "
        "output channel, what XNNPACK and ONNX Runtime run fastest)",
    )
    group.add_argument(
        "--mean",
        type=_floats,
        metavar="M[,M,M]",
        help="image normalization mean (default: timm's pretrained_cfg, else none)",
    )
    group.add_argument("--std", type=_floats, metavar="S[,S,S]", help="image normalization std")
    group.add_argument(
        "--input-size",
        type=_size,
        metavar="H[,W]",
        help="size calibration images are resized and "
        "cropped to (default: timm's pretrained_cfg, else the example input's)",
    )


def check_options(args: argparse.Namespace, has_onnx: bool, has_pte: bool) -> None:
    """Refuse inconsistent int8 options before any work is done (:class:`~reparam.errors.InputError`)."""
    int8_only = [
        flag
        for flag, value in (
            ("--calib", args.calib),
            ("--calib-random", args.calib_random),
            ("--per-tensor", args.per_tensor),
            ("--mean", args.mean),
            ("--std", args.std),
            ("--input-size", args.input_size),
        )
        if value
    ]
    if not args.int8:
        if int8_only:
            raise InputError(f"{int8_only[0]} only applies to int8 output. Add --int8")
        return
    if not (has_onnx or has_pte):
        raise InputError("--int8 writes int8 .pte and/or .onnx programs. Add --pte OUT.pte or --onnx OUT.onnx")
    if getattr(args, "dtype", None) is not None:
        raise InputError("--int8 quantizes the float32 model; --dtype does not apply. Leave out --dtype")
    if args.calib is None and args.calib_random is None:
        raise InputError(
            "--int8 needs calibration inputs. Pass --calib DIR (images) or --calib FILE.npy, or "
            "--calib-random N for a smoke test"
        )
    if args.calib is not None and not args.calib.exists():
        raise InputError(f"calibration input {args.calib} does not exist. Give a folder of images or a .npy file")
    if args.calib is not None and args.calib.is_file() and args.calib.suffix.lower() != ".npy":
        raise InputError(
            f"--calib {args.calib}: give a folder of images or a .npy array, not a "
            f"{args.calib.suffix or 'suffix-less'} file"
        )


def load_calibration(args: argparse.Namespace, model: Any, example_shape: tuple[int, ...]) -> "calib.Calibration":
    """The calibration inputs the options name."""
    if args.calib_random is not None:
        return calib.from_random(args.calib_random, example_shape)
    if args.calib.is_dir():
        prep = calib.preprocessing(model, example_shape, args.mean, args.std, args.input_size)
        return calib.from_images(args.calib, example_shape[1], prep)
    return calib.from_npy(args.calib, example_shape)


def write(
    fused: Any,
    original: Any,
    calibration: "calib.Calibration",
    args: argparse.Namespace,
    stage: Any,
    ui: Any,
    onnx_path: Path | None,
    pte_path: Path | None,
) -> list:
    """The int8 programs asked for, staged in ``stage`` (ONNX first, as ``convert`` orders its outputs) and
    compared with the float ``fused`` and ``original`` models."""
    from . import int8

    per_channel = not args.per_tensor
    evaluate = calibration.samples[:EVAL_SAMPLES]
    results = []
    if onnx_path is not None:
        with ui.step(f"Quantizing to int8 (ONNX Runtime, QDQ), writing and running {onnx_path.name}"):
            results.append(
                int8.quantize_onnx(
                    fused,
                    calibration,
                    stage.path(onnx_path),
                    per_channel=per_channel,
                    opset=args.opset or int8.DEFAULT_OPSET,
                    eval_samples=evaluate,
                    original=original,
                )
            )
    if pte_path is not None:
        with ui.step(f"Quantizing to int8 (PT2E, XNNPACK), writing and running {pte_path.name}"):
            results.append(
                int8.quantize_pte(
                    fused,
                    calibration,
                    stage.path(pte_path),
                    per_channel=per_channel,
                    eval_samples=evaluate,
                    original=original,
                )
            )
    return results


def print_report(ui: Any, results: list, fused: Any) -> None:
    """The equalization summary (when it ran) and each int8 program's agreement with the float model."""
    equalization = getattr(getattr(fused, "reparam_report", None), "equalization", None)
    if equalization is not None:
        ui.out.print(str(equalization).splitlines()[0], highlight=False, soft_wrap=True)
        for row in sorted(equalization.layers, key=lambda r: r.before_db)[:5]:
            ui.out.print(f"  {row.name}: {row.before_db:.1f} -> {row.after_db:.1f} dB", highlight=False)
    warnings: list[str] = []
    for result in results:
        if not hasattr(result, "agreement") or result.agreement is None:
            continue
        a = result.agreement
        top1 = f", top-1 agreement {a.top1:.1%}" if a.top1 is not None else ""
        ui.out.print(
            f"int8 {result.format} ({result.granularity} weights, {result.runtime}): output SNR "
            f"{a.snr_db:.1f} dB{top1}, max |error| {a.max_abs:.3g} vs the float model on {a.samples} "
            f"calibration inputs; calibration: {result.calibration}",
            highlight=False,
            soft_wrap=True,
        )
        warnings += [w for w in result.warnings if w not in warnings]
    for warning in warnings:
        ui.err.print(f"warning: {warning}", highlight=False, soft_wrap=True)
