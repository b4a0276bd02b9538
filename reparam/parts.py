"""Fuse a model that does not trace as a whole, part by part, each part proven on the inputs it sees.

Top down from the root, the largest submodules that torch.fx traces are the *parts*; a module that does
not trace keeps its Python ``forward`` and its children are tried instead, so containers that are
iterated rather than called (``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict`` walked by a
parent's loop, as in ultralytics' YOLO) are reached too.  One eager float64 run records every call of
every part (inputs and output, cloned, since parents often update them in place afterwards); each part
is fused as one graph and checked against itself on each recorded call.  A part whose trace is not
faithful to its eager self is replaced by its own parts.

Because each part is checked where it is used, a detector whose outputs pass top-k / NMS is never
refused for reordered ties: the proof is local, before any data-dependent post-processing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from . import trace as T
from .errors import one_line
from .proofs import UnfaithfulTrace, check_fused
from .report import Report
from .verify import fresh

MAX_CALLS = 4  # distinct input signatures checked per module


@dataclass
class Call:
    """One call of a module in the recording run: its inputs and what it returned (float64 clones)."""

    args: tuple
    kwargs: dict
    output: Any


def _signature(args: tuple, kwargs: dict) -> tuple:
    return tuple(
        (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t) for t in tree_leaves((args, kwargs))
    )


def record_calls(
    model: nn.Module, inputs: tuple, only: set | None = None, kwargs: dict | None = None
) -> tuple[dict, Any, set]:
    """(module -> its recorded :class:`Call` s, the model's output, every module called) from one eager
    run of ``inputs`` (and keyword arguments ``kwargs``).

    ``only``: the modules to record (default: every submodule); every module is still seen to be called
    or not.  Up to :data:`MAX_CALLS` calls with distinct input shapes are kept per module.
    """
    calls: dict = {}
    pending: dict = {}
    seen: dict = {}
    called: set = set()

    def mark(module, args):
        called.add(module)

    def before(module, args, kwargs):
        pending.setdefault(module, []).append((fresh(args), fresh(kwargs)))

    def after(module, args, kwargs, output):
        args0, kwargs0 = pending[module].pop()
        signature = _signature(args0, kwargs0)
        known = seen.setdefault(module, set())
        if signature not in known and len(known) < MAX_CALLS:
            known.add(signature)
            calls.setdefault(module, []).append(Call(args0, kwargs0, fresh(output)))

    handles = [m.register_forward_pre_hook(mark) for m in model.modules()]
    for m in model.modules() if only is None else only:
        handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(m.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = model(*fresh(inputs), **fresh(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return calls, output, called


def _positional(gm: fx.GraphModule, call: Call) -> tuple | None:
    """``call``'s inputs as the positional arguments of ``gm``'s placeholders (None if they do not map)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(str(n.target).startswith("*") for n in placeholders) or len(call.args) > len(placeholders):
        return None
    values = list(call.args)
    for node in placeholders[len(call.args) :]:
        if node.target in call.kwargs:
            values.append(call.kwargs[node.target])
        elif node.args:  # the default value fx recorded
            values.append(node.args[0])
        else:
            return None
    return tuple(values)


@dataclass
class _Slot:
    """A traceable part of the model: ``parent.<name>`` (``parent`` None for the root) and its trace."""

    parent: nn.Module | None
    name: str
    module: nn.Module
    path: str
    gm: fx.GraphModule


class PartFuser:
    """Fuse the parts of one model that does not trace as a whole.

    ``fuse_graph(gm, inputs, path) -> pristine`` rewrites a traced part in place (the pipeline's passes)
    and returns its unfused twin for the proofs; ``record(model, modules) -> (calls, output, called)``
    runs the model once, recording the calls of ``modules`` (:func:`record_calls` on the example inputs).
    ``prove``: check each fused part against the original on its recorded calls (False: the caller checks the whole
    model, and the recorded calls need only have the right shapes).
    """

    def __init__(self, report: Report, fuse_graph: Callable, record: Callable, prove: bool = True):
        self.report = report
        self.fuse_graph = fuse_graph
        self.record = record
        self.prove = prove
        self.done: dict = {}  # id(module) -> its replacement (a module registered twice is fused once)
        self.worst = 0.0  # largest relative error of a fused part against its original
        self.output: Any = None  # the original model's output in the first recording run
        self.untraceable: dict = {}  # module -> the error its forward raised in a trace (see ``_trace``)

    def fuse(self, root: nn.Module, trace_error: Exception, path: str = "") -> nn.Module:
        """``root`` (at ``path`` in the model, "" for the model itself; it does not trace, or traces unfaithfully:
        ``trace_error``) with its parts fused in place.  Parts are the largest submodules that trace; only they are
        recorded, so memory stays that of their inputs and outputs.  A part that is never called while some of its
        descendants are (a Sequential its parent iterates), or whose trace turns out unfaithful, is replaced by its
        own parts, recorded in a further run."""
        self._note_untraced(root, path, trace_error)
        culprit = T.untraceable_module(trace_error)
        if culprit is not None:
            self.untraceable[culprit] = trace_error
        pending = self._plan(root, path)
        first = True
        while pending:
            calls, output, called = self.record(root, {slot.module for slot in pending})
            if first:
                self.output, first = output, False
            after = []
            for slot in pending:
                if slot.module not in calls:  # iterated rather than called, or not used on these inputs
                    if any(m in called for m in slot.module.modules()):
                        after += self._plan(slot.module, slot.path)
                    continue
                new, why = self._fuse_part(slot, calls[slot.module])
                if new is not None:
                    setattr(slot.parent, slot.name, new)
                elif why is not None:
                    self._note_untraced(slot.module, slot.path, why)
                    after += self._plan(slot.module, slot.path)
            pending = after
        return root

    def _plan(self, module: nn.Module, path: str) -> list:
        """The largest traceable descendants of ``module`` (top down), as slots."""
        slots = []
        for name, child in module.named_children():
            child_path = f"{path}.{name}".lstrip(".")
            try:
                gm = self._trace(child)
            except Exception as err:  # noqa: BLE001  any failure tracing the user's code: the reason goes to the notes
                if any(True for _ in child.parameters()):
                    self._note_untraced(child, child_path, err)
                slots += self._plan(child, child_path)
                continue
            slots.append(_Slot(module, name, child, child_path, gm))
        return slots

    def _trace(self, module: nn.Module) -> fx.GraphModule:
        """:func:`reparam.trace.symbolic_trace`, except that a module containing one whose forward is known not
        to trace fails at once with that error (tracing it again would fail there again)."""
        for culprit, err in self.untraceable.items():
            if any(m is culprit for m in module.modules()):
                raise err
        try:
            return T.symbolic_trace(module)
        except Exception as err:
            culprit = T.untraceable_module(err)
            if culprit is not None:
                self.untraceable[culprit] = err
            raise

    def _note_untraced(self, module: nn.Module, path: str, err: Exception) -> None:
        if not path:
            self.report.notes.append(
                f"{type(module).__name__} does not trace as a whole ({why_untraced(err)}): its "
                "parts are fused one by one, each checked on the inputs it sees"
            )
        elif list(module.children()):
            self.report.notes.append(f"{path}: {why_untraced(err)}; its parts fused separately")
        else:
            self.report.notes.append(f"{path} left unfused: {why_untraced(err)}")

    def _fuse_part(self, slot: _Slot, calls: list) -> tuple[nn.Module | None, Exception | None]:
        """(the fused part, None), (None, why its trace cannot be used), or (None, None) when fusing
        changed nothing (the original stays, with its own interface)."""
        if id(slot.module) in self.done:
            return self.done[id(slot.module)], None
        gm, before = slot.gm, len(self.report.rewrites)
        pristine = self.fuse_graph(gm, _positional(gm, calls[0]), slot.path)
        if len(self.report.rewrites) == before:
            return None, None
        if not self.prove:
            self.done[id(slot.module)] = gm
            return gm, None
        try:
            for call in calls:
                err = check_fused(
                    gm,
                    pristine,
                    slot.module,
                    call.args,
                    call.kwargs,
                    call.output,
                    slot.path,
                    self.report.notes,
                    _positional(pristine, call),
                )
                self.worst = max(self.worst, err)
        except UnfaithfulTrace as err:
            del self.report.rewrites[before:]
            return None, err
        self.done[id(slot.module)] = gm
        return gm, None


def why_untraced(err: Exception) -> str:
    """Why a module's trace cannot be used, in a few words for the report's notes."""
    if isinstance(err, UnfaithfulTrace):
        return str(err).split(": ", 1)[-1]
    return f"not traceable ({type(err).__name__}: {one_line(err)[:120]})"
