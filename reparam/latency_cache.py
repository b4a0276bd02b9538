"""Measured merge decisions, kept in memory and in a JSON file, so that repeated fuses time nothing and decide alike.

Key: ``device | dtype | input shapes | signature of the region as it is | signature merged`` (built by
:class:`reparam.cost.LatencyCost`); value: ``{"before_s", "after_s", "merge"}``.  The file is
``$REPARAM_CACHE_DIR/latency.json`` when that variable is set, else ``~/.cache/reparam/latency.json``, or a path given
explicitly.  It is written atomically (:func:`reparam.io.atomic_write`) after each new measurement, merged with what
other processes wrote meanwhile.  A corrupt or unreadable file is ignored with a :class:`LatencyCacheWarning` (the
cache then starts empty); a file that cannot be written leaves the cache in memory only, with one warning.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

VERSION = 1
FILE_NAME = "latency.json"


class LatencyCacheWarning(UserWarning):
    """The latency cache file could not be read or written; decisions are still made (and timed)."""


def default_path() -> Path:
    """``$REPARAM_CACHE_DIR/latency.json``, else ``~/.cache/reparam/latency.json``."""
    directory = os.environ.get("REPARAM_CACHE_DIR")
    return Path(directory).expanduser() / FILE_NAME if directory else Path.home() / ".cache" / "reparam" / FILE_NAME


class LatencyCache:
    """``get(key)`` / ``put(key, entry)`` over an in-memory dict backed by the JSON file at ``path`` (None: only in
    memory).  Use :meth:`at` to share one cache per file within a process."""

    _shared: dict = {}

    def __init__(self, path: Union[str, os.PathLike, None] = None):
        self.path = None if path is None else Path(path)
        self.entries: Optional[dict] = None if self.path is not None else {}
        self._write_failed = False

    @classmethod
    def at(cls, path: Union[str, os.PathLike, None] = None) -> "LatencyCache":
        """The process-wide cache of the file at ``path`` (None: :func:`default_path`, read when first asked)."""
        resolved = Path(path).expanduser() if path is not None else default_path()
        key = str(resolved.absolute())
        if key not in cls._shared:
            cls._shared[key] = cls(resolved)
        return cls._shared[key]

    def get(self, key: str) -> Optional[dict]:
        if self.entries is None:
            self.entries = self._read(warn=True)
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        if self.entries is None:
            self.entries = self._read(warn=True)
        self.entries[key] = entry
        if self.path is not None and not self._write_failed:
            self._write()

    def __len__(self) -> int:
        return len(self.entries or {})

    # -- the file --------------------------------------------------------------------------------------------
    def _read(self, warn: bool) -> dict:
        """The file's entries; {} when it is missing, or (warning when ``warn``) unreadable or not a cache."""
        try:
            data = json.loads(self.path.read_text())
            entries = data.get("entries") if isinstance(data, dict) and data.get("version") == VERSION else None
            if not isinstance(entries, dict):
                raise ValueError(f"not a reparam latency cache of version {VERSION}")
            return {k: v for k, v in entries.items() if _valid(v)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            if warn:
                warnings.warn(
                    f"reparam: ignoring the latency cache {self.path} ({err}); timings start afresh",
                    LatencyCacheWarning,
                    stacklevel=4,
                )
            return {}

    def _write(self) -> None:
        from .errors import ReparamError
        from .io import atomic_write

        merged = {**self._read(warn=False), **self.entries}  # keep what other processes measured meanwhile
        text = json.dumps({"version": VERSION, "entries": dict(sorted(merged.items()))}, indent=1)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda tmp: tmp.write_text(text))
        except (OSError, ReparamError) as err:
            self._write_failed = True
            warnings.warn(
                f"reparam: cannot write the latency cache {self.path} ({err}); it is kept in memory only",
                LatencyCacheWarning,
                stacklevel=4,
            )


def _valid(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("merge"), bool)
        and all(isinstance(entry.get(k), (int, float)) for k in ("before_s", "after_s"))
    )
