"""All-or-nothing output: write every artifact beside its target, then move them all into place, or none.

A conversion that writes several files (``.pt2``, ``.onnx``, ``.pte``, ``.mlpackage``) must not leave some of them
behind when a later one fails its check, and must not leave temporaries behind when it is interrupted::

    with Staging() as stage:
        export_pt2(model, x, stage.path(Path("out/model.pt2")))   # writes out/.reparam-staging-XXXX/model.pt2
        export_onnx(model, x, stage.path(Path("out/model.onnx")))
        stage.commit()                                             # both renamed into out/, or neither

:meth:`Staging.path` hands out a staged path that has the target's own file name, inside a private hidden
directory created next to the target: the final move is a rename on the same file system, and a writer that
records its file name (``torch.export.save`` names the archive after the file) writes the same bytes whatever
temporary name a run used.  :meth:`Staging.commit` moves every staged artifact onto its target; an existing target
is moved aside first and put back if a later move fails.  Leaving the ``with`` block, committed or not (an
error, Ctrl-C, SIGTERM), removes the private directories and everything still in them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from reparam.errors import OutputPathError
from reparam.io import write_error

__all__ = ["Staging", "STAGING_PREFIX"]

#: Name prefix of the private directories (hidden, so a listing of the output directory stays clean meanwhile).
STAGING_PREFIX = ".reparam-staging-"


class Staging:
    """Staged paths for several targets, committed together (see the module docstring)."""

    def __init__(self) -> None:
        self._private: dict[Path, Path] = {}  # target directory -> its private staging directory
        self._pairs: list[tuple[Path, Path]] = []  # (staged, target)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        """Discard what is still staged; an :class:`~reparam.errors.OutputPathError` is re-raised naming the target
        instead of the staged path."""
        pairs = list(self._pairs)
        self.discard()
        if isinstance(exc, OutputPathError):
            message = str(exc)
            for staged, target in pairs:
                message = message.replace(str(staged), str(target))
            if message != str(exc):
                raise OutputPathError(message) from exc

    def path(self, target: str | os.PathLike) -> Path:
        """The staged path to write ``target`` to (same file name, in a private directory next to ``target``)."""
        target = Path(target)
        directory = target.parent
        if directory not in self._private:
            try:
                self._private[directory] = Path(tempfile.mkdtemp(dir=directory, prefix=STAGING_PREFIX))
            except OSError as exc:
                raise write_error(directory, exc) from exc
        staged = self._private[directory] / target.name
        self._pairs.append((staged, target))
        return staged

    def commit(self) -> list[Path]:
        """Move every staged artifact onto its target; returns the targets that replaced an existing file.

        All or nothing: when a move fails, the targets already moved are taken back out and the files they
        replaced restored, and :class:`~reparam.errors.OutputPathError` is raised.
        """
        done: list[tuple[Path, Path, Path | None]] = []  # (staged, target, where the old target was put)
        try:
            for staged, target in self._pairs:
                backup = None
                if target.exists() or target.is_symlink():
                    backup = staged.with_name(f"{staged.name}.previous")
                    os.replace(target, backup)
                done.append((staged, target, backup))
                os.replace(staged, target)
        except BaseException as exc:
            self._roll_back(done)
            if isinstance(exc, OSError):
                raise OutputPathError(
                    f"cannot move {staged.name} into place ({exc.strerror or exc}), so no "
                    "output was written. Choose another output path"
                ) from exc
            raise
        return [target for _, target, backup in done if backup is not None]

    @staticmethod
    def _roll_back(done: list[tuple[Path, Path, Path | None]]) -> None:
        for staged, target, backup in reversed(done):
            with contextlib.suppress(OSError):
                if not staged.exists() and (target.exists() or target.is_symlink()):
                    os.replace(target, staged)  # the new artifact goes back into staging (removed with it)
                if backup is not None:
                    os.replace(backup, target)

    def discard(self) -> None:
        """Remove the private directories with whatever is still staged in them (nothing after a commit)."""
        for private in self._private.values():
            shutil.rmtree(private, ignore_errors=True)
        self._private.clear()
        self._pairs.clear()
