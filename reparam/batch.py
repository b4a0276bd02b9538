"""``reparam convert CKPT... --out-dir DIR``: many checkpoints in one process, under one progress bar.

Each checkpoint is converted on its own (:func:`reparam.cli._convert_one`, all or nothing per checkpoint) into
``DIR/<stem>_deploy.<format>`` for each of ``--formats``; one that fails (a corrupt file, keys that do not match, a
failed verification) is reported in the summary table with its one-line error, and the others are still
converted.  The exit code is 0 when all succeed, else 1 if any failed verification or crashed, else 2.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reparam import jsonout, terminal
from reparam.errors import UsageError

__all__ = ["convert_all", "planned_outputs"]

_OPTION = {"pt2": "output", "onnx": "onnx", "pte": "pte", "mlpackage": "coreml"}


def planned_outputs(checkpoint: Path, out_dir: Path, formats: tuple[str, ...]) -> dict[str, Path]:
    """The ``args`` attribute (``output``, ``onnx``, ...) -> path of every file written for ``checkpoint``."""
    return {_OPTION[f]: out_dir / f"{checkpoint.stem}_deploy.{f}" for f in formats}


def _check_plan(args: argparse.Namespace) -> None:
    """Refuse what would go wrong for every checkpoint: single-file options, a missing directory, name clashes."""
    single = [
        flag
        for flag, value in (("-o", args.output), ("--onnx", args.onnx), ("--pte", args.pte), ("--coreml", args.coreml))
        if value is not None
    ]
    if single:
        raise UsageError(
            f"{', '.join(single)} names one file, but --out-dir writes one per checkpoint. Leave out "
            f"{single[0]} and choose the formats with --formats (e.g. --formats pt2,onnx)"
        )
    if not args.out_dir.is_dir():
        raise UsageError(f"--out-dir {args.out_dir} is not a directory. Create it first (mkdir -p {args.out_dir})")
    stems: dict[str, Path] = {}
    for checkpoint in args.checkpoints:
        if checkpoint.stem in stems and stems[checkpoint.stem] != checkpoint:
            raise UsageError(
                f"{stems[checkpoint.stem]} and {checkpoint} would both be written as "
                f"{checkpoint.stem}_deploy.*. Rename one of them"
            )
        stems[checkpoint.stem] = checkpoint


def convert_all(args: argparse.Namespace, ui: Any, convert_one: Callable[..., dict]) -> int:
    """Convert every checkpoint of ``args.checkpoints``; print a summary table; return the exit code."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from reparam.cli import EXIT_OK, _error_line

    _check_plan(args)
    results: list[dict] = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("[dim]{task.fields[step]}"),
        console=ui.err,
        transient=True,
    )
    with progress:
        task = progress.add_task("Converting", total=len(args.checkpoints), step="")
        ui.progress = (progress, task)
        try:
            for checkpoint in args.checkpoints:
                progress.update(task, description=f"Converting {checkpoint.name}")
                one = copy.copy(args)
                one.checkpoint = checkpoint
                for option, path in planned_outputs(checkpoint, args.out_dir, args.formats).items():
                    setattr(one, option, path)
                try:
                    entry = convert_one(one, ui, print_report=False)
                except Exception as exc:  # noqa: BLE001  one checkpoint's failure, whatever it is, is its line in
                    # the summary (its one-line message and exit code); the next checkpoint still runs
                    message, code = _error_line(exc)
                    entry = getattr(exc, "reparam_result", None) or jsonout.new_result(
                        "convert", args.arch, checkpoint, args.device
                    )
                    entry.update(status="failed", error=message, exit_code=code)
                results.append(entry)
                progress.advance(task)
        finally:
            ui.progress = None
    _print_summary(ui, results)
    failed = [r for r in results if r["status"] != "ok"]
    code = EXIT_OK if not failed else (1 if any(r["exit_code"] != 2 for r in failed) else 2)
    if args.json is not None:
        jsonout.write(args.json, jsonout.document("convert", results, code))
    return code


def _print_summary(ui: Any, results: list[dict]) -> None:
    """One row per checkpoint: status, speed figure, files written or the error."""
    table = terminal.table(
        f"converted {sum(r['status'] == 'ok' for r in results)} of {len(results)} checkpoints",
        "checkpoint",
        "status",
        ("speed", "right"),
        "written / error",
    )
    for entry in results:
        name = Path(entry["checkpoint"]).name
        if entry["status"] == "ok":
            speed = entry.get("speed")
            figure = f"{speed['ratio']:.2f}× ({speed['low']:.2f}–{speed['high']:.2f}×)" if speed else "-"
            written = ", ".join(Path(o["path"]).name for o in entry["outputs"])
            table.add_row(name, "[green]ok[/]", figure, written)
        else:
            table.add_row(name, f"[red]failed ({entry['exit_code']})[/]", "", entry["error"])
    ui.out.print(table)
