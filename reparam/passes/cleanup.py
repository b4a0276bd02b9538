"""Cleanup: drop rank/dtype assertions left behind by folded layers, then dead code.

``_assert(x.ndim == 4)`` (timm's BatchNormAct2d) -> nothing.  Precondition: the condition reads only a
tensor's rank, dtype or device and constants; those are fixed by the traced graph, so the check can
only fail on inputs the original model rejects as well (the fused model then fails in its own conv).
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from ..report import Report
from . import PassResult
from .mutation import eliminate_dead_code, is_metadata_user

_ASSERTS = {torch._assert}
_LOGIC = {
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.and_,
    operator.or_,
    operator.not_,
    operator.truth,
}


def _static(arg: Any) -> bool:
    """True when ``arg`` is built only from constants and rank/dtype/device reads."""
    if isinstance(arg, (list, tuple)):
        return all(_static(a) for a in arg)
    if not isinstance(arg, fx.Node):
        return True
    if is_metadata_user(arg):
        return True
    if arg.op == "call_function" and arg.target in _LOGIC:
        return all(_static(a) for a in arg.args)
    return False


def drop_static_asserts(gm: fx.GraphModule, report: Report | None = None) -> PassResult:
    """Remove assertions on rank/dtype/device; ``changed``: how many were removed (nothing to report: such a
    check can only fail where the original model fails too)."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users and _static(node.args[0]):
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        eliminate_dead_code(gm)
    return PassResult(removed)


def drop_unused_tensors(gm: fx.GraphModule) -> None:
    """Delete the GraphModule's own parameters/buffers that no node reads any more (folded constants);
    submodules' tensors go with ``delete_all_unused_submodules``."""
    read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for table in (gm._parameters, gm._buffers):
        for name in [n for n in table if n not in read]:
            del table[name]


def finish(gm: fx.GraphModule) -> None:
    """After a pass rewired ``gm``: drop dead nodes and modules, regenerate the code (:func:`regenerate`)."""
    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    regenerate(gm)


_DEFERRED: weakref.WeakSet = weakref.WeakSet()  # GraphModules whose code is regenerated once, after all passes


def regenerate(gm: fx.GraphModule) -> None:
    """``gm.recompile()``, unless ``gm`` is inside :func:`code_regenerated_once`: the passes read graphs, not code,
    and generating and compiling the code of a few thousand nodes costs 0.02-0.05 s each time."""
    if gm not in _DEFERRED:
        gm.recompile()


@contextlib.contextmanager
def code_regenerated_once(gm: fx.GraphModule) -> Iterator[None]:
    """Inside: the passes' :func:`regenerate` calls on ``gm`` do nothing; on leaving, its code is regenerated once."""
    _DEFERRED.add(gm)
    try:
        yield
    finally:
        _DEFERRED.discard(gm)
        gm.recompile()
