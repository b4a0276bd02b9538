"""Python's cyclic garbage collector around a fuse: no full collection inside, the fuse's own garbage freed at the end.

A fuse creates some 10^5 objects (fx graphs and nodes, the private float64 copy's modules, the pristine copies the
proofs keep), most of them in reference cycles (an fx node points at its graph and the graph at its nodes), so none
is freed when the fuse returns: they wait for the next full collection, which a process that fuses one model after
another may not run for several fuses.  Meanwhile their tensors (the float64 copy of the model, its folded weights:
several times the model's size) stay allocated, and each later fuse takes fresh memory, whose first touch is the
slowest part of an allocation on a virtual machine (10-15 us a page: levit_conv_384_s8 fused 2.4 s with the garbage
of the fuse before freed, 3.9 s without).  A full collection of the whole process costs 150-200 ms with torch and
timm imported (some 4 * 10^5 objects), as much as a small model's whole fuse, so :func:`collected_after` freezes the
objects that exist before the fuse (:func:`gc.freeze`: the collector ignores them), collects once at the end (only the
fuse's own objects are traversed: 5-25 ms) and unfreezes them.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collected_after() -> Iterator[None]:
    """before -> after: the objects created inside the block that are garbage on leaving it (also by an
    exception) are freed on leaving it; inside, no full (oldest-generation) collection runs (young ones still do,
    so cycles among short-lived objects are freed as usual); thresholds and the objects' frozen state as before.

    Precondition for the collection at the end: nothing in the process is frozen already (a server that froze
    its objects after importing keeps them frozen: then only the thresholds are changed, and the fuse's garbage
    waits for a full collection as before).
    """
    thresholds = gc.get_threshold()
    own_freeze = gc.get_freeze_count() == 0
    if own_freeze:
        gc.freeze()
    gc.set_threshold(thresholds[0], thresholds[1], 10**9)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if own_freeze:
            gc.collect()
            gc.unfreeze()
