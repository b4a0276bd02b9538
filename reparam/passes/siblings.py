"""Sibling merge: convolutions (or linears) that read the same tensor become one kernel with concatenated outputs.

    x -> conv_1(x), ..., conv_n(x)                        (n kernels, each output read on its own)
 -> x -> conv(x) -> narrow(conv(x), 0, o_1), ...          (one kernel; each output a view of its channels)

The outputs are ``torch.narrow`` views along the channel axis (the last axis for linears): no copy kernel.
Where a view could reach code that depends on its strides (``.view``, a module or function whose body
fx did not trace, the graph's output), ``.contiguous()`` follows it, which copies only when the view is not
contiguous already (a batch of more than one, or a linear's columns).

Precondition (else the siblings are left as they are): each sibling is a call of ``nn.Conv{1,2,3}d`` (not
transposed) or ``nn.Linear`` with the shared node as its only argument; siblings have the same in-channels,
stride, output grid (:func:`reparam.affine.concat`: same padding relative to the kernel centre), groups 1,
padding they can share, and the same weight dtype; none reads the tensor after an in-place update could have
changed it (:func:`~reparam.passes.mutation.mutation_barriers`).  Kernels of the same size and padding merge
at no MAC cost; a smaller kernel embedded in a larger one (a 1x1 next to a 3x3 with centred padding) costs
MACs, so the cost model decides each merge (``MacCost`` refuses those), and a refusal is reported.

Runs after collapse, towers and residual removal: those rules match the separate convs (a residual block's
downsample is its own conv there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .. import affine as A
from .. import cost as C
from ..emit import device_of, module_for
from ..lift import Concat, Constants, Lifter, NotAffine, Sum, Unary
from ..proofs import REWRITE
from ..report import Report, Rewrite
from ..match import computes_as_conv, is_conv, node_shape, shape_meta
from . import PassResult
from .cleanup import finish
from .naming import block_prefix, fresh_name
from .mutation import _may_alias, mutation_barriers, real_users

EVENT = "merge_siblings"
MAX_ROUNDS = 4

# reads of a tensor's memory layout: a view of a wider tensor answers them differently
_STRIDE_METHODS = {
    "view",
    "view_as",
    "stride",
    "is_contiguous",
    "data_ptr",
    "storage",
    "untyped_storage",
    "storage_offset",
    "as_strided",
    "set_",
    "resize_",
    "resize_as_",
    "numpy",
    "tolist",
}
_SAFE_FUNCTION_MODULES = ("torch", "_operator", "operator", "math", "builtins")


class _Sibling:
    """A conv / linear call on ``x``: its node, its map, and the dtype its weight is cast back to (None: unknown)."""

    def __init__(self, node: fx.Node, affine: A.Affine, dtype):
        self.node, self.affine, self.dtype = node, affine, dtype


def merge_siblings(
    gm: fx.GraphModule,
    report: Report,
    cost: Optional[C.CostModel] = None,
    dtypes: Optional[Mapping] = None,
    default_dtype: Optional[torch.dtype] = None,
) -> PassResult:
    """Merge every set of siblings the cost model accepts; the graph is rewritten in place.

    ``cost``: asked for every merge (default :class:`~reparam.cost.MacCost`); a refusal is reported with its
    reason.  ``dtypes`` (read only): parameter name -> the dtype it is cast back to (the pipeline's map; the weights
    are all float64 while it folds); ``default_dtype``: that of parameters missing there (modules other passes
    created).  Siblings whose dtypes differ are not merged.  Returns the merges applied, the modules created and,
    for each, the siblings it replaces (the pipeline gives it their dtype); the new nodes carry their shapes, so
    shapes do not go stale.
    """
    cost = cost if cost is not None else C.MacCost()
    known = dtypes if dtypes is not None else {}
    dtype_of = lambda node: known.get(f"{node.target}.weight", default_dtype)  # noqa: E731
    replaces: dict = {}
    roots = list(gm.graph.nodes)
    for _ in range(MAX_ROUNDS):  # the views of a merged output can have siblings of their own
        done, roots = _sweep(gm, roots, report, cost, dtype_of)
        if not done:
            break
        replaces.update(done)
        finish(gm)
    return PassResult(len(replaces), tuple(replaces), shapes_stale=False, replaces=replaces)


def _sweep(gm: fx.GraphModule, roots: list, report: Report, cost: C.CostModel, dtype_of) -> tuple[dict, list]:
    """Merge the siblings on each of ``roots``; ({module created: the sibling targets it replaces}, the views)."""
    lifter = Lifter(gm, Constants(gm))
    modules = dict(gm.named_modules())
    barriers = mutation_barriers(gm).barriers
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    created, views = {}, []
    for x in roots:
        for group in _groups(x, lifter, modules, barriers, dtype_of):
            for chosen in _decide(gm, group, x, cost, report, lifter):
                subset = sorted(chosen, key=lambda s: order[s.node])
                targets = tuple(str(s.node.target) for s in subset)
                name, rewrite, made = _merge(gm, x, subset, modules)
                report.rewrites.append(rewrite)
                created[name] = targets
                views += made
    return created, views


def _siblings_of(x: fx.Node, lifter: Lifter, modules: dict, barriers: set, dtype_of) -> list:
    found = []
    for user in x.users:
        if user.op != "call_module" or user in barriers or user.args != (x,) or user.kwargs:
            continue
        m = modules.get(str(user.target))
        if not (computes_as_conv(m) or isinstance(m, nn.Linear)):
            continue
        try:
            op = lifter.lift(user)
        except (A.Refusal, NotAffine):
            continue
        if not isinstance(op, Unary) or op.affine is None or op.affine.groups != 1:
            continue
        found.append(_Sibling(user, op.affine, dtype_of(user)))
    return found


def _groups(x: fx.Node, lifter: Lifter, modules: dict, barriers: set, dtype_of) -> list:
    """The siblings on ``x`` that could share one kernel, in sets of at least two."""
    sets: dict = {}
    for s in _siblings_of(x, lifter, modules, barriers, dtype_of):
        a = s.affine
        # the output grid (kernel centre minus padding), as affine._align requires it
        grid = tuple(hi - (e - 1 - lo) for hi, e, lo in zip(a.pad_hi, a.extent, a.pad_lo, strict=True))
        key = (a.layout, a.in_channels, a.stride, grid, a.padding_mode, s.dtype, a.weight.device)
        sets.setdefault(key, []).append(s)
    return [group for group in sets.values() if len(group) > 1]


def _decide(gm: fx.GraphModule, group: list, x: fx.Node, cost: C.CostModel, report: Report, lifter: Lifter) -> list:
    """The sets of ``group`` to merge: all of it if the cost model accepts, else each set of identical geometry."""
    subsets = [group]
    shapes: dict = {}
    for s in group:
        a = s.affine
        shapes.setdefault((a.kernel, a.pad_lo, a.pad_hi, a.dilation), []).append(s)
    if len(shapes) > 1:
        subsets += [same for same in shapes.values() if len(same) > 1]
    chosen: list = []
    for subset in subsets:
        if any(s in c for c in chosen for s in subset) or _one_join(subset, lifter):
            continue
        where = block_prefix([s.node for s in subset]) or subset[0].node.name
        try:
            candidate = _candidate(gm, subset, x, where)
        except A.Refusal as r:
            report.refuse(where, f"siblings {_before(subset)}: {r}")
            continue
        decision = C.ask(cost, candidate, report)
        if decision.merge:
            chosen.append(subset)
        else:
            report.refuse(where, f"siblings {_before(subset)}: {decision.reason}")
    return chosen


def _one_join(subset: list, lifter: Lifter) -> bool:
    """The siblings are read only by one sum or channel concatenation: a region collapse already weighed
    (``merge_parallel`` / ``merge_concat``) and kept, so the cost model is not asked twice."""
    readers = {u for s in subset for u in real_users(s.node)}
    if len(readers) != 1 or any(len(real_users(s.node)) != 1 for s in subset):
        return False
    try:
        return isinstance(lifter.lift(readers.pop()), (Sum, Concat))
    except (A.Refusal, NotAffine):
        return False


def _candidate(gm: fx.GraphModule, subset: list, x: fx.Node, where: str) -> C.Candidate:
    """The merge of ``subset`` as the cost model sees it (MACs on the recorded shapes, per root position where one
    is unknown; the merged form built without its weights: :func:`reparam.cost.stand_in`); Refusal when no single
    module computes it.  The forms are built only while the cost model decides."""
    merged = A.concat([s.affine for s in subset])  # raises Refusal when the grids do not line up
    if merged.pad_lo != merged.pad_hi:
        raise A.Refusal("no single module pads asymmetrically (the merged kernel would need a pad of its own)")
    shapes = [node_shape(s.node) for s in subset]
    known = [shape for shape in shapes if shape is not None]
    if len(known) == len(subset):
        before = sum(C.conv_macs(s.affine, shape) for s, shape in zip(subset, known, strict=True))
        after = C.conv_macs(merged, _widened(known[0], merged))
    else:
        before, after = sum(s.affine.macs() for s in subset), merged.macs()
    shape = node_shape(x)
    return C.Candidate(
        where=where,
        kind=EVENT,
        before_macs=before,
        after_macs=after,
        before_kernels=len(subset),
        after_kernels=C.emitted_kernels(merged),
        input_shapes=(torch.Size(shape),) if shape is not None else (),
        before=lambda: C.subgraph_module(gm, [x], [s.node for s in subset]),
        after=lambda: _Split(_kernel(C.stand_in(merged), "meta"), _sizes(subset), _channel_dim(merged)),
    )


def _widened(shape: tuple, merged: A.Affine) -> tuple:
    """A sibling's output shape with the merged kernel's channel count."""
    wide = list(shape)
    wide[_channel_dim(merged)] = merged.out_channels
    return tuple(wide)


def _sizes(subset: list) -> list:
    return [s.affine.out_channels for s in subset]


def _channel_dim(a: A.Affine) -> int:
    """The channel axis counted from the end: the same for batched and unbatched inputs."""
    return -1 if a.layout.channels_last else -(a.nd + 1)


def _kernel(merged: A.Affine, device) -> nn.Module:
    """The one conv / linear computing ``merged`` (the siblings' outputs stacked along channels).

    Precondition: symmetric padding (:func:`_candidate` refuses others)."""
    module = module_for(merged, torch.float64, device)
    assert is_conv(module) or isinstance(module, nn.Linear), module
    return module


class _Split(nn.Module):
    """The region merged: one kernel, its output split into views."""

    def __init__(self, kernel: nn.Module, sizes: list, dim: int):
        super().__init__()
        self.kernel, self.sizes, self.dim = kernel, sizes, dim

    def forward(self, x: torch.Tensor) -> tuple:
        y = self.kernel(x)
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        return tuple(torch.narrow(y, self.dim, s, n) for s, n in zip(starts, self.sizes, strict=True))


def _before(subset: list) -> str:
    return " + ".join(s.affine.describe() for s in subset)


def _merge(gm: fx.GraphModule, x: fx.Node, subset: list, modules: dict) -> tuple[str, Rewrite, list]:
    """Replace ``subset`` (in graph order) by one kernel on ``x`` and a view per sibling; (the new module's name,
    the rewrite, the views)."""
    merged_affine = A.concat([s.affine for s in subset])
    kernel = _kernel(merged_affine, device_of(gm))
    where = block_prefix([s.node for s in subset])
    name = fresh_name(gm, [s.node for s in subset], "siblings")
    gm.add_submodule(name, kernel)
    rewrite = Rewrite(
        where or subset[0].node.name,
        _before(subset),
        f"{merged_affine.describe()}, split into {len(subset)} views",
        (EVENT,),
    )
    graph, first, dim = gm.graph, subset[0].node, _channel_dim(merged_affine)
    with graph.inserting_before(first):
        merged = graph.call_module(name, (x,))
        shape = node_shape(first)
        if shape is not None:
            merged.meta["tensor_meta"] = shape_meta(first, _widened(shape, merged_affine))
        start, views = 0, []
        for j, s in enumerate(subset):
            # named after the merged kernel: the proofs name a disagreeing region by its node
            view = graph.create_node(
                "call_function",
                torch.narrow,
                (merged, dim, start, s.affine.out_channels),
                name=f"{merged.name}_view{j}",
            )
            start += s.affine.out_channels
            if _layout_escapes(s.node, modules):
                view.meta["tensor_meta"] = s.node.meta.get("tensor_meta")
                view = graph.call_method("contiguous", (view,))
            view.meta.update(s.node.meta)  # shape, origin (the proofs compare it with the sibling's value)
            view.meta[REWRITE] = f"{rewrite.before} -> {rewrite.after}"
            s.node.replace_all_uses_with(view)
            views.append(view)
    for s in subset:
        graph.erase_node(s.node)
    return name, rewrite, views


def _layout_escapes(node: fx.Node, modules: dict) -> bool:
    """``node``'s value, or a tensor sharing its storage, may reach code that reads its strides."""
    stack, seen = [node], {node}
    while stack:
        for user in stack.pop().users:
            if user.op == "output" or _reads_layout(user, modules):
                return True
            if user not in seen and _may_alias(user, modules):
                seen.add(user)
                stack.append(user)
    return False


def _reads_layout(user: fx.Node, modules: dict) -> bool:
    """``user`` may depend on its input's strides: a layout query, or code fx did not trace into."""
    if user.op == "call_method":
        return user.target in _STRIDE_METHODS
    if user.op == "call_function":
        home = str(getattr(user.target, "__module__", None) or "")
        traced = home.split(".")[0] in _SAFE_FUNCTION_MODULES
        return not traced or getattr(user.target, "__name__", "") == "as_strided"
    if user.op == "call_module":
        m = modules.get(user.target)
        return m is None or not type(m).__module__.startswith("torch.nn.")
    return False
