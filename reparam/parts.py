"""Fuse a model that does not trace as a whole, part by part, each part proven on the inputs it sees.

One eager float64 run records every call of every submodule (inputs and output, cloned, since parents
often update them in place afterwards).  Then, depth first from the root: a module that was called and
traces is fused as one graph and checked against itself on each recorded call; a module that does not
trace, or whose trace is not faithful to its eager self, keeps its Python ``forward`` and its children
are fused instead.  Containers that are iterated rather than called (``nn.Sequential`` / ``nn.ModuleList``
/ ``nn.ModuleDict`` walked by a parent's loop, as in ultralytics' YOLO) are descended into too.

Because each part is checked where it is used, a detector whose outputs pass top-k / NMS is never
refused for reordered ties: the proof is local, before any data-dependent post-processing.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from . import trace as T
from .errors import EquivalenceError
from .proofs import UnfaithfulTrace, check_fused
from .report import Report

MAX_CALLS = 4  # distinct input signatures checked per module


@dataclass
class Call:
    """One call of a module in the recording run: its inputs and what it returned (float64 clones)."""

    args: tuple
    kwargs: dict
    output: Any


def _clone(value: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)


def _signature(args: tuple, kwargs: dict) -> tuple:
    return tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t)
                 for t in tree_leaves((args, kwargs)))


def record_calls(model: nn.Module, inputs: tuple) -> tuple[dict, Any]:
    """(module -> its recorded :class:`Call` s, the model's output) from one eager run of ``inputs``.

    Up to :data:`MAX_CALLS` calls with distinct input shapes are kept per module.
    """
    calls: dict = {}
    pending: dict = {}
    seen: dict = {}

    def before(module, args, kwargs):
        pending.setdefault(module, []).append((_clone(args), _clone(kwargs)))

    def after(module, args, kwargs, output):
        args0, kwargs0 = pending[module].pop()
        signature = _signature(args0, kwargs0)
        known = seen.setdefault(module, set())
        if signature not in known and len(known) < MAX_CALLS:
            known.add(signature)
            calls.setdefault(module, []).append(Call(args0, kwargs0, _clone(output)))

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(m.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = model(*_clone(inputs))
    finally:
        for h in handles:
            h.remove()
    return calls, output


def _positional(gm: fx.GraphModule, call: Call) -> Optional[tuple]:
    """``call``'s inputs as the positional arguments of ``gm``'s placeholders (None if they do not map)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(str(n.target).startswith("*") for n in placeholders) or len(call.args) > len(placeholders):
        return None
    values = list(call.args)
    for node in placeholders[len(call.args):]:
        if node.target in call.kwargs:
            values.append(call.kwargs[node.target])
        elif node.args:  # the default value fx recorded
            values.append(node.args[0])
        else:
            return None
    return tuple(values)


class PartFuser:
    """Fuse the parts of one model that trace; ``fuse_graph(gm, inputs, path) -> pristine`` rewrites a
    traced part in place (the pipeline's passes) and returns its unfused twin for the proofs."""

    def __init__(self, calls: dict, report: Report, fuse_graph: Callable):
        self.calls = calls
        self.report = report
        self.fuse_graph = fuse_graph
        self.done: dict = {}  # id(module) -> its replacement (a module registered twice is fused once)
        self.worst = 0.0  # largest relative error of a fused part against its original
        self.reached: dict = {}  # id(module) -> whether it or a descendant was called

    def _reaches_a_call(self, module: nn.Module) -> bool:
        """Was ``module`` or one of its descendants called in the recording run?"""
        key = id(module)
        if key not in self.reached:
            self.reached[key] = module in self.calls or any(self._reaches_a_call(c) for c in module.children())
        return self.reached[key]

    def fuse(self, module: nn.Module, path: str = "", trace_error: Optional[Exception] = None) -> nn.Module:
        """``module`` or its fused replacement; children are replaced inside ``module`` itself."""
        if id(module) in self.done:
            return self.done[id(module)]
        replacement = None
        if module in self.calls and trace_error is None:
            replacement, trace_error = self._fuse_traced(module, path)
        if replacement is None:
            if trace_error is not None:
                self._note_untraced(module, path, trace_error)
            self._fuse_children(module, path)
            replacement = module
        self.done[id(module)] = replacement
        return replacement

    def _note_untraced(self, module: nn.Module, path: str, err: Exception) -> None:
        if not path:
            self.report.notes.append(f"{type(module).__name__} does not trace as a whole ({_why(err)}): its "
                                     "parts are fused one by one, each checked on the inputs it sees")
        elif list(module.children()):
            self.report.notes.append(f"{path}: {_why(err)}; its parts fused separately")
        else:
            self.report.notes.append(f"{path} left unfused: {_why(err)}")

    def _fuse_children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            if not self._reaches_a_call(child):
                continue
            new = self.fuse(child, f"{path}.{name}".lstrip("."))
            if new is not child:
                setattr(module, name, new)

    def _fuse_traced(self, module: nn.Module, path: str) -> tuple[Optional[nn.Module], Optional[Exception]]:
        """(the fused part, None), (None, why it cannot be used), or (None, None) when fusing changed nothing."""
        try:
            gm = T.symbolic_trace(module)
        except Exception as err:  # data-dependent control flow and the like
            return None, err
        calls = self.calls[module]
        before = len(self.report.rewrites)
        pristine = self.fuse_graph(gm, _positional(gm, calls[0]), path)
        if len(self.report.rewrites) == before:
            return None, None  # nothing to gain: the original stays, with its own interface
        where = path or type(module).__name__
        try:
            for call in calls:
                err = check_fused(gm, pristine, module, call.args, call.kwargs, call.output, where,
                                  self.report.notes, _positional(pristine, call))
                self.worst = max(self.worst, err)
        except UnfaithfulTrace as err:
            del self.report.rewrites[before:]
            return None, err
        return gm, None


def _why(err: Exception) -> str:
    if isinstance(err, UnfaithfulTrace):
        return str(err).split(": ", 1)[-1]
    return f"not traceable ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
