"""User-facing errors: one line that names the problem and the fix, and :func:`one_line` to print any exception so.

Every error reparam raises on purpose is a :class:`ReparamError`; the CLI maps the two families to exit codes:
:class:`InputError` (something the user supplied is wrong: exit code 2) and :class:`EquivalenceError` (a result
disagrees with the model it came from: exit code 1).  Messages read ``<problem>. <what to do>``.

This module imports nothing heavy (no torch), so that ``reparam --help`` can name the errors it catches.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "one_line",
    "ReparamError",
    "EquivalenceError",
    "InputError",
    "UsageError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "UnknownArchError",
    "StateDictMismatchError",
    "OutputPathError",
    "MissingPackageError",
    "UnsupportedDtypeError",
    "PrecisionError",
    "GraphDrawingError",
    "ExportError",
    "ExportMismatchError",
]


def one_line(exc: BaseException, more: str = "") -> str:
    """``exc``'s message on one line: its first non-blank line, stripped (the exception's type name when the
    message is blank), then ``more`` when lines were left out (``" (more with --debug)"``, say)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] + (more if len(lines) > 1 else "")


# ------------------------------------------------------------------------------------------------ families


class ReparamError(Exception):
    """Base class of every error reparam raises on purpose."""


class EquivalenceError(ReparamError):
    """The fused model disagrees with the original (a compiler bug: please report the model)."""


class InputError(ReparamError):
    """Something the user supplied is wrong (a file, an architecture, a path); the CLI exits with code 2."""


# ------------------------------------------------------------------------------------------------- inputs


class UsageError(InputError):
    """The command line itself is wrong (exit code 2)."""


class CheckpointError(InputError):
    """The checkpoint is missing, unreadable, or holds no state dict."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint is a pickle that needs code outside the ``weights_only`` allow-list to load.

    ``globals`` lists the offending ``module.name`` references (possibly empty when torch did not name them).
    """

    def __init__(self, message: str, globals_: Iterable[str] = ()):
        super().__init__(message)
        self.globals = list(globals_)


class UnknownArchError(InputError):
    """The architecture name is not in the zoo, timm or torchvision."""


class StateDictMismatchError(InputError):
    """The checkpoint's keys or shapes do not match the model's.

    ``missing``/``unexpected`` are key lists; ``mismatched`` is a list of ``(key, checkpoint_shape, model_shape)``.
    """

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class OutputPathError(InputError):
    """An output path cannot be written (missing or read-only directory, same file as the input, full disk...)."""


class MissingPackageError(InputError):
    """An optional package a requested output needs is not installed or cannot be imported (CLI exit code 2)."""


class UnsupportedDtypeError(InputError):
    """The requested output format cannot hold or run the model's precision (CLI exit code 2)."""


class PrecisionError(InputError):
    """The model cannot be deployed in the requested precision (overflow, or too much accuracy lost)."""


class GraphDrawingError(InputError):
    """A drawing cannot be produced (unsupported file type, no renderer installed)."""


# ------------------------------------------------------------------------------------------------ exports


class ExportError(ReparamError):
    """The model could not be exported (tracing failed, an op has no ONNX translation, ...)."""


class ExportMismatchError(EquivalenceError):
    """The exported file, run back, disagrees with the model it was exported from (CLI exit code 1)."""
