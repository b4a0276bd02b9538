"""Fuse inside the modules that a whole-model trace calls as they are.

A module with children whose own forward does not trace (timm's ``LiteMLA``, ``MobileVitV2Block``,
``LocalWindowAttention``: Python control flow on a traced size) is one opaque ``call_module`` in the whole-model
graph (:func:`reparam.trace.trace_whole`); the rest of the model is fused and verified as one graph, crops
included.  Its own children may still hold convolutions and BatchNorms to fold: they are fused here, part by part
(:class:`reparam.parts.PartFuser`), inside a private copy of the module, each part's shapes from a stand-in run of
the copy (:mod:`reparam.shape_run`) on random inputs of the shapes the whole model's shape run recorded for it.
The copy takes the module's place in the graph only; the eager model the whole graph is verified against keeps the
original, so the whole-model check proves the parts too (the pipeline falls back to the part-by-part path, which
proves each part on what it receives, when that check disagrees).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils._pytree import tree_map

from .interface import restore_state, snapshot_state
from .module_copy import deep_copy
from .parts import PartFuser, record_calls
from .report import Report
from .shape_run import ShapeRecorder, StandIns
from .trace import plain_containers


class CannotFuseInside(Exception):
    """An opaque module's children cannot be fused in place (the caller fuses the model part by part instead)."""


def fuse_inside(gm: fx.GraphModule, parents: dict, report: Report, fuse_graph, state: dict, shared: set) -> None:
    """before -> after: ``gm`` calls each module of ``parents`` (path -> the TraceError of its forward) as it is ->
    ``gm`` calls a copy of it whose traceable parts are fused (the report gains their rewrites and notes), not yet
    checked: the caller checks ``gm`` against the eager model.

    ``fuse_graph(gm, inputs, path)``: the passes on one part (paths are the model's).  ``state``: the snapshot the
    final restore uses, extended with each copy's state before its recording run.  ``shared``: the modules of the
    eager model, which must not change.  Raises :class:`CannotFuseInside` when a module's inputs are not tensors of
    known shape (nothing to run it on) or its container in ``gm`` is one of ``shared``.
    """
    first_calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in parents:
            first_calls.setdefault(node.target, node)
    for path, error in parents.items():
        if path not in first_calls:  # the passes left no call of it
            continue
        owner_path, _, name = path.rpartition(".")
        owner = gm.get_submodule(owner_path)
        if owner in shared:
            raise CannotFuseInside(f"{path}: its container is the model's own module")
        args, kwargs = stand_in_inputs(first_calls[path])
        private = structural_copy(gm.get_submodule(path))
        state.update(snapshot_state(private))
        before = len(report.rewrites)
        parts = PartFuser(report, fuse_graph, partial(_record_shapes, args=args, kwargs=kwargs), prove=False)
        try:
            fused = parts.fuse(private, error, path)
        finally:
            restore_state(private, state)  # caches the recording run left (values from random inputs)
        if len(report.rewrites) > before:
            setattr(owner, name, fused)


def _record_shapes(model: nn.Module, only: set, args: tuple, kwargs: dict) -> tuple:
    """:func:`record_calls` of ``model`` on ``args`` / ``kwargs`` with stand-ins for its heavy ops
    (:class:`reparam.shape_run.StandIns`: the parts need the shapes of their calls only); for real where that run
    fails (an op that reads a value)."""
    try:
        with torch.no_grad(), StandIns():
            return record_calls(model, args, only, kwargs)
    except Exception:  # noqa: BLE001  NeedsValues, or any failure on stand-in values: run it for real
        return record_calls(model, args, only, kwargs)


def structural_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s module tree (its own submodules, attributes and containers) sharing its parameters and
    buffers: replacing a descendant of the copy leaves ``module`` as it was.  (The passes never write a tensor in
    place, so sharing them is safe.)"""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return deep_copy(module, memo)


def stand_in_inputs(node: fx.Node, seed: int = 0) -> tuple[tuple, dict]:
    """(args, kwargs) for the module ``node`` calls: a standard-normal tensor (seeded) in place of each floating
    tensor the shape run recorded (shape and dtype of ``meta['tensor_meta']``), the plain values it recorded (a size
    the graph computed: ``meta[ShapeRecorder.PLAIN]``) and constants as the graph holds them.  Raises
    :class:`CannotFuseInside` for an input whose value is neither a recorded floating tensor nor a plain value."""
    generator = torch.Generator().manual_seed(seed)

    def random(meta: Any) -> Any:
        if not isinstance(meta, TensorMetadata):
            return meta
        if not meta.dtype.is_floating_point:
            raise CannotFuseInside(f"{node.target}: takes a {meta.dtype} tensor (values unknown)")
        return torch.randn(tuple(meta.shape), generator=generator, dtype=meta.dtype)

    def value(arg: fx.Node) -> Any:
        meta = arg.meta.get("tensor_meta")
        if meta is None and ShapeRecorder.PLAIN in arg.meta:
            return arg.meta[ShapeRecorder.PLAIN]
        if meta is None:
            raise CannotFuseInside(f"{node.target}: input {arg.name} is not a tensor of recorded shape")
        return tree_map(random, meta, is_leaf=lambda m: isinstance(m, TensorMetadata))

    return plain_containers(fx.node.map_arg(node.args, value)), plain_containers(fx.node.map_arg(node.kwargs, value))
