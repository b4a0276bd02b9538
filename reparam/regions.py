"""The whole-model check of a model that cannot run on a crop, without two float64 passes at full size.

A fixed-grid transformer (a position table, a window grid) is checked on its inputs, and there the float64 runs of
the fused graph and of the eager model were the largest part of a fuse (cait_xs24_384: 4.5 of 5.6 s).  But most of
such a graph is untouched by the rewrites: layer scales folded into linears, a relative-position table or a clamped
``logit_scale`` folded into a buffer.  :func:`checked_by_regions` proves the same thing in two parts:

1. **The trace is faithful**: its unfused twin (:class:`reparam.proofs.Pristine`) and the eager model, both in
   float32, return the same bits on the inputs (a faithful trace runs the model's ops in its order).  That run of
   the twin records the activations the rewritten regions read.
2. **Every rewritten region computes what it replaced**: each fused node that differs from the twin's node of its
   origin (another op or target, another module or tensor, arguments of other origins) is evaluated in float64 on
   the recorded activations, next to the subgraph of the twin that computed its origin (teacher-forced, as
   :func:`reparam.proofs.prove` does), and must agree within :data:`reparam.proofs.LOCAL_FLOOR`.  Nodes that are
   the same op on the same values compute the same values: they are not run at all.

Anything it cannot conclude (another dtype than float32, an in-place update, different bits, a region further off
than the floor, a failure) returns None, and the float64 check on the inputs decides, with its proofs and its
noise rule: this path only ever accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils._pytree import tree_flatten, tree_map

from .dtypes import in_float32
from .interface import match_containers
from .lift import passes_through
from .passes.mutation import may_alias, updates_in_place
from .proofs import LOCAL_FLOOR, ORIGIN, Pristine, run_quietly
from .verify import fresh, relative_error, to_dtype

#: the regions are evaluated only when they cost (both sides together, :func:`_cost`) at most this share of one run
#: of the whole graph: past it, two float32 passes and the regions cost more than two float64 passes
MOST_REWRITTEN = 0.8


@dataclass
class RegionPlan:
    """What :func:`checked_by_regions` runs: ``changed`` (fused nodes to evaluate, in order, the output last),
    ``closure`` (twin nodes to evaluate, in order), ``recorded`` (twin node names whose float32 values the recording
    run keeps: unchanged and reached by the input), ``targets`` (twin node names whose float64 values the fused
    side reads or is compared with), ``share`` (what evaluating both costs, against one run of the graph)."""

    changed: list
    closure: list
    recorded: set
    targets: set
    share: float
    regions: int = field(default=0)


def plan(fused: fx.GraphModule, twin: fx.GraphModule) -> RegionPlan | None:
    """The :class:`RegionPlan` of ``fused`` against ``twin`` (its unfused trace, node names = origins); None when the
    graphs update a value in place that another node reads too (a recorded activation would then not be what that
    node reads)."""
    modules = dict(twin.named_modules())
    if not all(_updates_alone(n, modules) for n in twin.graph.nodes if updates_in_place(n, modules)):
        return None
    by_name = {n.name: n for n in twin.graph.nodes}
    source = _sources(twin)
    twin_reached = _reached_by_input(twin.graph)  # values computed from weights alone are evaluated, not recorded
    unchanged = [n for n in fused.graph.nodes if n.op != "output" and _same_as_twin(n, fused, twin, by_name, source)]
    recorded = {n.meta[ORIGIN] for n in unchanged if by_name[n.meta[ORIGIN]] in twin_reached}
    same = set(unchanged)
    changed = [n for n in fused.graph.nodes if n not in same]  # the output node among them, always
    fused_modules = dict(fused.named_modules())
    if not all(_updates_alone(n, fused_modules) for n in changed if updates_in_place(n, fused_modules)):
        return None
    targets = {n.meta[ORIGIN] for n in changed if n.meta.get(ORIGIN) in by_name}
    targets |= {a.meta[ORIGIN] for n in changed for a in n.all_input_nodes if a in same}
    targets.add(next(n.name for n in reversed(twin.graph.nodes) if n.op == "output"))
    closure = _closure([by_name[t] for t in targets], recorded)
    read = targets | {a.name for n in closure for a in n.all_input_nodes}
    recorded &= read  # only what the regions read is kept
    twin_cost = {n.name: _cost(n, twin) for n in twin.graph.nodes}
    regional = sum(twin_cost[n.name] for n in closure) + sum(
        _cost(n, fused) or twin_cost.get(n.meta.get(ORIGIN), 0) for n in changed
    )
    total = sum(twin_cost[n.name] for n in twin.graph.nodes)
    share = regional / total if total else 0.0
    regions = sum(1 for n in changed if n.op != "output" and n.meta.get(ORIGIN) in by_name)
    return RegionPlan(changed, closure, recorded, targets, share, regions)


def checked_by_regions(
    fused: fx.GraphModule, pristine: Pristine, reference: nn.Module, inputs: tuple, caches_undone
) -> tuple[float, int] | None:
    """(worst relative error of a rewritten region, how many regions) when ``fused`` (the rewritten whole-model trace
    of the float64 ``reference``) is shown equal to ``reference`` on the float64 ``inputs`` as the module docstring
    says; None when that is not concluded.  ``caches_undone()``: a context that puts back the caches the runs leave.
    Precondition: every floating weight of ``reference`` and its inputs are float32 in the user's model (checked in
    float64 here).  On success ``fused`` returns the eager model's containers (:func:`match_containers`)."""
    twin = pristine.module()
    regions = plan(fused, twin)
    if regions is None or regions.share > MOST_REWRITTEN:
        return None
    if _arguments(twin, inputs) is None or _arguments(fused, inputs) is None:
        return None
    try:
        with caches_undone():
            faithful = _faithful_in_float32(twin, reference, inputs, regions.recorded)
        if faithful is None:
            return None
        recorded, want = faithful
        with caches_undone(), torch.no_grad():
            worst, got = _regions_in_float64(fused, twin, regions, inputs, recorded)
    except Exception:  # noqa: BLE001  whatever fails here, the float64 check on the inputs runs and names it
        return None
    if worst is None or not worst <= LOCAL_FLOOR:
        return None
    if tree_flatten(got)[1].num_leaves != tree_flatten(want)[1].num_leaves:
        return None
    match_containers(fused, got, want)
    return worst, regions.regions


def _faithful_in_float32(twin: fx.GraphModule, reference: nn.Module, inputs: tuple, wanted: set):
    """(the float32 values of ``wanted`` twin nodes, the eager output) when the twin and ``reference``, both in
    float32, return the same bits on ``inputs``; None otherwise.  Their float64 weights are put back after."""
    float64 = in_float32(reference, twin)
    try:
        args = to_dtype(inputs, torch.float32)
        recorder = _Recording(twin, wanted)
        traced = run_quietly(recorder.run, args)
        want = run_quietly(reference, args)
    finally:
        for t, data in float64:
            t.data = data
    traced_leaves, want_leaves = tree_flatten(traced)[0], tree_flatten(want)[0]
    if len(traced_leaves) != len(want_leaves) or not all(
        _same_bits(a, b) for a, b in zip(traced_leaves, want_leaves, strict=True)
    ):
        return None
    return recorder.values, want


def _regions_in_float64(
    fused: fx.GraphModule, twin: fx.GraphModule, regions: RegionPlan, inputs: tuple, recorded: dict
) -> tuple[float | None, Any]:
    """(worst relative error of a fused region against the twin's subgraph, the fused output) in float64."""
    at = {name: to_dtype(v, torch.float64) for name, v in recorded.items()}
    twin_run, fused_run = fx.Interpreter(twin), fx.Interpreter(fused)
    for run in (twin_run, fused_run):
        run.env = _arguments(run.module, inputs) or {}
    for n in twin.graph.nodes:
        if n.name in at:  # its own copy: an in-place node of the twin may write into it
            twin_run.env[n] = fresh(at[n.name])
    users = {n: 0 for n in twin.graph.nodes}
    for n in regions.closure:
        for a in n.all_input_nodes:
            users[a] += 1
    for n in regions.closure:  # values no later node reads are let go: float64 maps of a large model are large
        twin_run.env[n] = twin_run.run_node(n)
        for a in n.all_input_nodes:
            users[a] -= 1
            if not users[a] and a.name not in regions.targets:
                del twin_run.env[a]
    twin_values = {n.name: v for n, v in twin_run.env.items()}
    worst, same = 0.0, set(fused.graph.nodes) - set(regions.changed)
    for n in fused.graph.nodes:
        if n in same and n.op != "placeholder" and n.users.keys() - same:
            origin = n.meta[ORIGIN]  # read by a region: the value of its origin, recorded or evaluated
            fused_run.env[n] = at[origin] if origin in at else twin_values[origin]
    fused_modules = dict(fused.named_modules())
    for n in regions.changed:
        if updates_in_place(n, fused_modules):  # what it writes into is the twin's value too
            fused_run.env[n.args[0]] = fresh(fused_run.env[n.args[0]])
        value = fused_run.run_node(n)
        origin = n.meta.get(ORIGIN) if n.op != "output" else _output_name(twin)
        if origin not in twin_values:
            fused_run.env[n] = value
            continue
        error = _error(value, twin_values[origin])
        if error is None:
            return None, None
        worst = max(worst, error)
        fused_run.env[n] = twin_values[origin] if n.op != "output" else value  # each region proven on its own
    return worst, fused_run.env[regions.changed[-1]]


class _Recording(fx.Interpreter):
    """Runs a graph and keeps a copy of the value of each node named in ``wanted`` (tensors cloned)."""

    def __init__(self, gm: fx.GraphModule, wanted: set):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)
        return value


def _updates_alone(n: fx.Node, modules: dict) -> bool:
    """In-place node ``n`` writes into a value only it reads, no input or weight, and if a view or a pass-through
    of another, one only that view reads, and so on (``ReLU(inplace=True)`` after a convolution and a dropout): no
    other node sees the update."""
    x = n.args[0] if n.args else None
    while isinstance(x, fx.Node) and x.op not in ("placeholder", "get_attr") and len(x.users) == 1:
        if not may_alias(x, modules):
            return True
        x = x.args[0] if x.args else None  # a view or pass-through: its source is written too
    return False


def _sources(twin: fx.GraphModule) -> dict:
    """twin node name -> the name of the node whose value it is: itself, or for a module that passes its input
    through (:func:`reparam.lift.passes_through`, which the passes drop), the source of that input."""
    source: dict = {}
    for n in twin.graph.nodes:
        first = n.args[0] if n.args else None
        through = n.op == "call_module" and isinstance(first, fx.Node) and len(n.args) == 1 and not n.kwargs
        if through and passes_through(_attribute(twin, n.target)):
            source[n.name] = source[first.name]
        else:
            source[n.name] = n.name
    return source


def _same_as_twin(n: fx.Node, fused: fx.GraphModule, twin: fx.GraphModule, by_name: dict, source: dict) -> bool:
    """Does fused node ``n`` compute what the twin's node of its origin computes, given equal inputs: the same op on
    the same target (the same module or tensor object), its arguments of the same origins (up to modules that pass
    their input through) and otherwise equal?"""
    p = by_name.get(n.meta.get(ORIGIN))
    if p is None or p.op != n.op:
        return False
    if n.op == "placeholder":
        return n.target == p.target
    if n.op in ("call_module", "get_attr"):
        if _attribute(fused, n.target) is not _attribute(twin, p.target):
            return False
    elif n.target != p.target:
        return False
    return _same_arguments((n.args, n.kwargs), (p.args, p.kwargs), source)


def _same_arguments(a: Any, b: Any, source: dict) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            return False
        origin = a.meta.get(ORIGIN)
        return origin in source and source[origin] == source[b.name]
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_arguments(x, y, source) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_arguments(a[k], b[k], source) for k in a)
    if isinstance(a, slice):
        return _same_arguments((a.start, a.stop, a.step), (b.start, b.stop, b.step), source)
    if isinstance(a, torch.Tensor):
        return a is b
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  an argument without a plain equality: not shown to be the same
        return False


def _closure(targets: list, recorded: set) -> list:
    """The twin nodes needed to evaluate ``targets`` from the ``recorded`` ones and the inputs, in graph order."""
    needed: set = set()
    stack = list(targets)
    while stack:
        n = stack.pop()
        if n in needed or n.op == "placeholder" or n.name in recorded:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in next(iter(targets)).graph.nodes if n in needed] if targets else []


def _reached_by_input(graph: fx.Graph) -> set:
    """The nodes whose value depends on a placeholder (the rest are computed from weights alone)."""
    reached: set = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in reached for a in n.all_input_nodes):
            reached.add(n)
    return reached


def _cost(n: fx.Node, gm: fx.GraphModule) -> int:
    """Roughly what evaluating ``n`` costs, from the shapes the shape run left (0 without them): the elements of its
    output, times one plus the inputs each output element sums over (a weight's fan-in, a matmul's inner side)."""
    out = _elements(n.meta.get("tensor_meta"))
    fan_in = 0
    if n.op == "call_module":
        weight = getattr(_attribute(gm, n.target), "weight", None)
        fan_in = weight.numel() // weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() > 1 else 0
    elif n.op in ("call_function", "call_method") and str(getattr(n.target, "__name__", n.target)) in _PRODUCTS:
        first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        meta = first.meta.get("tensor_meta") if first is not None else None
        fan_in = meta.shape[-1] if isinstance(meta, TensorMetadata) and len(meta.shape) else 0
    elif n.op == "call_function":
        weights = [a for a in n.all_input_nodes if a.op == "get_attr"]
        tensors = [t for a in weights if isinstance(t := _attribute(gm, a.target), torch.Tensor) and t.dim() > 1]
        fan_in = max((t.numel() // t.shape[0] for t in tensors), default=0)
    return out * (1 + fan_in)


_PRODUCTS = frozenset({"matmul", "bmm", "mm", "baddbmm", "einsum"})


def _elements(meta: Any) -> int:
    if isinstance(meta, TensorMetadata):
        return math.prod(meta.shape)
    if isinstance(meta, (tuple, list)):
        return sum(_elements(m) for m in meta)
    if isinstance(meta, dict):
        return sum(_elements(m) for m in meta.values())
    return 0


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def _arguments(gm: fx.GraphModule, inputs: tuple) -> dict | None:
    """placeholder -> its value: the positional ``inputs`` in order, then the defaults; None when they do not map
    one to one (too many inputs, ``*args``, a placeholder without a default left over)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) > len(placeholders) or any(str(n.target).startswith("*") for n in placeholders):
        return None
    values = dict(zip(placeholders, inputs, strict=False))
    for n in placeholders[len(inputs) :]:
        if not n.args:
            return None
        values[n] = n.args[0]
    return values


def _output_name(gm: fx.GraphModule) -> str:
    return next(n.name for n in reversed(gm.graph.nodes) if n.op == "output")


def _same_bits(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _error(got: Any, want: Any) -> float | None:
    """Worst relative error over the floating leaves of two values of one structure; None when they differ
    otherwise (structure, shapes, integer or other leaves)."""
    got_leaves, got_spec = tree_flatten(got)
    want_leaves, want_spec = tree_flatten(want)
    if got_spec != want_spec:
        return None
    worst = 0.0
    for a, b in zip(got_leaves, want_leaves, strict=True):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            if not isinstance(a, torch.Tensor) or a.shape != b.shape:
                return None
            err = relative_error(a, b, absolute_at_zero=True)
            if math.isnan(err):
                return None
            worst = max(worst, err)
        elif not _same_bits(a, b):
            return None
    return worst
