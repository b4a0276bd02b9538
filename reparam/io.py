"""File output: output paths checked before any work, files and directories written whole or not at all.

- :func:`check_output_path` refuses an output that cannot be written (a directory, a missing or read-only
  directory, the input file itself) before a conversion starts; :func:`same_file` tells two paths of one file.
- :func:`atomic_write` (a file) and :func:`atomic_write_dir` (a directory such as a ``.mlpackage``) let a writer
  produce the output under a fresh hidden name next to the target, then move it onto the target with
  :func:`os.replace`: a failed write leaves the target as it was and no temporary behind.
- :func:`write_error` is the one-line :class:`~reparam.errors.OutputPathError` for a failed write (full disk,
  read-only file system ...).

Checkpoint reading lives in :mod:`reparam.checkpoints`, architecture building in :mod:`reparam.architectures`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from reparam.errors import InputError, OutputPathError  # noqa: F401  (InputError: reparam.shapes imports it from here)

__all__ = [
    "check_output_path",
    "same_file",
    "atomic_write",
    "atomic_write_dir",
    "write_error",
]


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate that ``path`` can be written and is none of ``inputs``; returns it as a :class:`Path`.

    Raises :class:`OutputPathError` when the path is a directory, its directory is missing / not a directory /
    not writable, or it names the same file as one of ``inputs``.
    """
    path = Path(path)
    for source in inputs:
        if same_file(path, Path(source)):
            raise OutputPathError(f"output {path} is the input file {source}. Choose a different output path")
    if path.is_dir():
        raise OutputPathError(f"output {path} is a directory. Give a file name, e.g. {path / 'model_deploy.pt2'}")
    directory = path.parent
    if not directory.exists():
        raise OutputPathError(f"output directory {directory} does not exist. Create it or choose another output path")
    if not directory.is_dir():
        raise OutputPathError(f"output directory {directory} is not a directory. Choose another output path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputPathError(f"output directory {directory} is not writable. Choose another output path")
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file (through links; by resolved path when one does not exist)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Any:
    """Call ``writer(tmp_path)`` to write a temporary file next to ``path``, then move it onto ``path``.

    The temporary file lives in the same directory (so :func:`os.replace` is atomic), keeps the suffix of ``path``
    (some writers insist on it, e.g. ``torch.export.save`` on ``.pt2``) and gets the permissions of a newly
    created file.  If ``writer`` raises, the temporary file is removed and ``path`` is left untouched.
    Returns what ``writer`` returned.  An unwritable directory or a failed write raises :class:`OutputPathError`.
    """
    path = Path(path)
    with _scratch(path, directory=False) as tmp:
        result = writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    return result


def atomic_write_dir(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Any:
    """Call ``writer(staged)`` to build a directory (or file) named like ``path`` in a hidden staging directory
    next to ``path``, then move it onto ``path``.

    An existing ``path`` is moved aside first and deleted only after the new one is in place (put back if that
    move fails); if ``writer`` raises, ``path`` is left as it was.  The staging directory is always removed.
    Returns what ``writer`` returned.  An unwritable directory or a failed write raises :class:`OutputPathError`.
    """
    path = Path(path)
    with _scratch(path, directory=True) as staging:
        staged = staging / path.name
        result = writer(staged)
        if path.exists() or path.is_symlink():
            old = staging / f"{path.name}.old"
            os.replace(path, old)
            try:
                os.replace(staged, path)
            except OSError:
                os.replace(old, path)
                raise
        else:
            os.replace(staged, path)
    return result


@contextlib.contextmanager
def _scratch(path: Path, directory: bool) -> Iterator[Path]:
    """A fresh hidden file (keeping the suffix of ``path``) or directory next to ``path``, removed when the block
    ends however it ends; an :class:`OSError` in the block is raised as :func:`write_error` for ``path``.

    Beside the target, so that moving it onto the target is a rename within one file system.
    """
    prefix = f".{path.stem}.tmp"
    try:
        if directory:
            scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix))
        else:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=path.suffix)
            os.close(fd)
            scratch = Path(name)
    except OSError as exc:
        raise OutputPathError(
            f"cannot write to {path.parent} ({exc.strerror or exc}). Choose another output path"
        ) from exc
    try:
        yield scratch
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        if directory:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # gone already once it was moved onto the target
                scratch.unlink()


def write_error(path: str | os.PathLike, exc: OSError) -> OutputPathError:
    """The one-line :class:`OutputPathError` for ``exc`` met while writing ``path`` (full disk, read-only ...).

    A ``shutil.Error`` (a failed directory copy) is reported by its first failure.
    """
    failures = exc.args[0] if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) else []
    if failures and isinstance(failures[0], tuple):
        why = str(failures[0][-1])
        match = re.match(r"\[Errno (\d+)\] ([^:]*)", why)
        code, reason = (int(match.group(1)), match.group(2)) if match else (None, why)
    else:
        code, reason = exc.errno, exc.strerror or str(exc)
    fix = "Free some space or choose" if code in (errno.ENOSPC, errno.EDQUOT) else "Choose"
    return OutputPathError(f"cannot write {path} ({reason}). {fix} another output path")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
