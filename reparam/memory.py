"""Memory a fuse frees is reused by the fuse, instead of going back to the system and being faulted in again.

glibc's ``malloc`` serves a large block (more than 128 KiB, a threshold it raises as blocks are freed) from a fresh
``mmap`` and unmaps it on ``free``.  A fuse allocates large blocks by the thousand: every activation of its float64
runs, every folded weight.  Each fresh block is zeroed page by page as it is first touched, and on a virtual
machine a page fault can cost 2-20 microseconds: hrnet_w40 spent 2.4 of its 4.8 s in the kernel, cait_xs24_384 1.3
of 5.7 s.  :func:`reused_memory` has ``malloc`` keep freed blocks in its heap for the length of the fuse (no
``mmap``, no trimming), so the second float64 run of a model reuses the pages of the first, then gives back what is
free when it ends (``malloc_trim``) and puts glibc's defaults back.

Nothing changes where the C library is not glibc, or where the user tunes ``malloc`` through the environment
(``MALLOC_*`` or ``GLIBC_TUNABLES``): their settings are theirs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

#: ``mallopt`` parameters (glibc's ``malloc.h``) and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
#: the most a heap keeps free at its top inside the block before trimming it (practically: never)
KEPT_TRIM_THRESHOLD = 1 << 30

_lock = threading.Lock()
_depth = 0  # nested blocks (a fuse inside a fuse): the outermost one restores


def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, when its ``malloc`` is glibc's and the environment does not tune it; else None."""
    if not sys.platform.startswith("linux"):
        return None
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None  # musl and other C libraries: their malloc is not tuned this way
    return libc


_LIBC = _glibc()


@contextlib.contextmanager
def reused_memory() -> Iterator[None]:
    """Inside the block, large blocks come from ``malloc``'s heap and stay there when freed; after it, the free ones
    are returned to the system and glibc's default thresholds hold again (fixed ones: setting them once stops
    glibc from moving its mmap threshold by itself, which changes where large blocks come from, not what they hold).
    Nothing happens without glibc (:func:`_glibc`)."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _LIBC.mallopt(M_MMAP_MAX, 0)
            _LIBC.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                _LIBC.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                _LIBC.malloc_trim(0)
