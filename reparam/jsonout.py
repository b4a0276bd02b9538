"""The ``--json`` document of ``reparam convert`` / ``reparam inspect``: everything the command found, as data.

One document per command run (schema: ``docs/report-schema.json``)::

    {"schema": "reparam-report/1", "reparam_version": "0.1.0", "command": "convert", "exit_code": 0,
     "results": [{"checkpoint": ..., "arch": ..., "status": "ok", "error": null, "report": {...}, ...}]}

``results`` holds one entry per checkpoint (several with ``convert --out-dir``).  A failed checkpoint still has
its entry, with ``status: "failed"``, the one-line ``error`` and ``exit_code``, and whatever was found before the
failure.  :func:`new_result` makes an entry with every key present, so that readers never miss one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA", "new_result", "document", "export_entry", "measures_entry", "write"]

SCHEMA = "reparam-report/1"


def new_result(command: str, arch: str, checkpoint: Path | None, device: str = "cpu") -> dict:
    """An entry of ``results`` with every key, filled in as the command goes."""
    return {
        "command": command,
        "arch": arch,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_size": None,
        "weights": None,
        "input_shape": None,
        "device": device,
        "status": "running",
        "exit_code": None,
        "error": None,
        "report": None,
        "measures": None,
        "speed": None,
        "errors": {},
        "outputs": [],
        "steps": [],
    }


def document(command: str, results: list[dict], exit_code: int) -> dict:
    """The whole ``--json`` document."""
    from reparam import __version__

    return {
        "schema": SCHEMA,
        "reparam_version": __version__,
        "command": command,
        "exit_code": exit_code,
        "results": results,
    }


def measures_entry(measures: Any) -> dict:
    """Parameters, MACs and executed kernels of one model (a ``cli.Measures``)."""
    return {
        "params": int(measures.params),
        "macs": int(measures.macs),
        "kernels": {k: int(v) for k, v in measures.kernels.items()},
    }


def export_entry(result: Any) -> dict:
    """One written file (an :class:`reparam.export.ExportResult` or a mobile result)."""
    entry = {
        "format": result.format,
        "path": str(result.path),
        "size": int(result.size),
        "dynamic_batch": bool(result.dynamic_batch),
        "opset": getattr(result, "opset", None),
        "errors": {k: float(v) for k, v in (result.errors or {}).items()},
        "abs_errors": {k: float(v) for k, v in (getattr(result, "abs_errors", None) or {}).items()},
    }
    for extra in ("precision", "delegated", "total_ops", "verified_in"):
        value = getattr(result, extra, None)
        if value is not None:
            entry[extra] = value if isinstance(value, (int, float, bool)) else str(value)
    return entry


def _plain(value: Any) -> Any:
    """Floats that JSON cannot hold (inf, nan) as strings, so the document stays standard JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` (``-``: stdout), whole or not at all."""
    text = json.dumps(_plain(doc), indent=2, allow_nan=False) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from reparam import io

    io.atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))  # OSError: an OutputPathError
