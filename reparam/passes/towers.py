"""Horizontal fusion: parallel towers of the same structure become one tower (ResNeXt's equivalence).

    x -> [conv_i -> act -> conv_i' -> ... ]_i -> sum_i / cat_i      (n paths of identical shape)
 -> x -> concat(conv_i) -> act -> direct_sum(conv_i') -> ... -> sum_over_inputs / direct_sum

First layers (same input) are concatenated along output channels, later layers become one grouped
(block-diagonal) conv, element-wise activations run once on the concatenated tensor, and the join is
a conv over the concatenated channels (sum) or the concatenation itself (cat).  Precondition: every
path has the same sequence of ops with the same shapes, each node has one user, and the paths meet in
one sum tree or one channel concatenation.  Runs after collapse, so BatchNorms are already folded.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .. import affine as A
from ..emit import device_of, module_for
from ..match import (
    ADD_FUNCTIONS_WITH_INPLACE,
    CONCAT_FUNCTIONS,
    arg,
    called_conv,
    called_module,
    conv_affine,
    node_shape,
)
from ..proofs import same_origin
from ..report import Report, Rewrite
from . import PassResult
from .cleanup import finish
from .mutation import real_users

_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu,
    nn.functional.relu,
    nn.functional.gelu,
    nn.functional.silu,
    torch.sigmoid,
    torch.tanh,
    nn.functional.hardswish,
    nn.functional.relu6,
}


def _signature(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Any, ...] | None:
    """What must be equal across paths at one step (None: not a tower op)."""
    m = called_conv(node, modules)
    if m is not None:
        return (
            "conv",
            type(m),
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
            m.padding_mode,
            m.bias is not None,
        )
    act = called_module(node, modules)
    if isinstance(act, _ELEMENTWISE):
        return ("act", repr(act))
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS and len(node.args) == 1:
        return ("fn", node.target, tuple(sorted(node.kwargs.items())))
    if node.op == "call_method" and node.target in ("relu", "sigmoid", "tanh") and len(node.args) == 1:
        return ("method", node.target)
    return None


def _single_user(node: fx.Node) -> fx.Node | None:
    users = real_users(node)
    return users[0] if len(users) == 1 and len(node.users) == 1 else None


def _is_add(node: fx.Node | None) -> bool:
    return node is not None and node.op == "call_function" and node.target in ADD_FUNCTIONS_WITH_INPLACE


def _sum_tree(heads: list[fx.Node]) -> tuple[fx.Node, list[fx.Node]] | None:
    """(root add, other addends) when the heads meet in one tree of two-input adds; else None."""
    inside: set[fx.Node] = set()
    frontier: set[fx.Node] = set()
    for h in heads:
        user = _single_user(h)
        if user is None or not _is_add(user):
            return None
        frontier.add(user)
    while True:
        inside |= frontier
        nxt = set()
        for add in frontier:
            if len(add.args) != 2 or add.kwargs:
                return None
            user = _single_user(add)
            if user is not None and _is_add(user) and user not in inside:
                nxt.add(user)
        if not nxt:
            break
        frontier = nxt
    roots = [a for a in inside if not any(u in inside for u in a.users)]
    if len(roots) != 1:
        return None
    leaves = [arg for a in inside for arg in a.args if arg not in inside]
    if not all(h in leaves for h in heads) or len(leaves) != len(set(leaves)):
        return None
    extras = [e for e in leaves if e not in heads]
    if not all(isinstance(e, fx.Node) for e in extras):
        return None
    return roots[0], [e for e in extras if isinstance(e, fx.Node)]


def _cat_join(heads: list[fx.Node]) -> tuple[fx.Node, list[fx.Node]] | None:
    user = _single_user(heads[0])
    if user is None or user.op != "call_function" or user.target not in CONCAT_FUNCTIONS:
        return None
    tensors, dim = arg(user, 0, "tensors"), arg(user, 1, "dim", 0)
    shape = node_shape(user)
    if shape is None or not isinstance(dim, int) or not isinstance(tensors, (list, tuple)):
        return None
    if (
        dim % len(shape) != 1
        or len(tensors) != len(heads)
        or set(tensors) != set(heads)
        or any(_single_user(h) is not user for h in heads)
    ):
        return None
    return user, list(tensors)


@dataclass
class _Towers:
    x: fx.Node
    steps: list[list[fx.Node]]  # per step, one node per path
    join: str  # "sum" or "cat"
    join_node: fx.Node
    extras: list[fx.Node]  # other addends of the sum tree


def _find(x: fx.Node, first: list[fx.Node], modules: dict[str, nn.Module]) -> _Towers | None:
    """Follow the paths starting at ``first`` (convs on x) in lockstep up to their join."""
    steps, heads = [first], list(first)
    while True:
        if len(steps) > 1:  # a single layer of convs on x is the collapse pass's (merge_parallel/concat)
            found = _join(x, steps, heads, modules)
            if found is not None:
                return found
        nexts = [n for n in (_single_user(h) for h in heads) if n is not None]
        if len(nexts) != len(heads) or any(not n.args or n.args[0] is not h for n, h in zip(nexts, heads, strict=True)):
            return None
        sig = _signature(nexts[0], modules)
        if sig is None or any(_signature(n, modules) != sig for n in nexts[1:]) or len(set(nexts)) != len(nexts):
            return None
        steps.append(nexts)
        heads = nexts


def _join(
    x: fx.Node, steps: list[list[fx.Node]], heads: list[fx.Node], modules: dict[str, nn.Module]
) -> _Towers | None:
    """The towers ending at ``heads``, if the heads meet in a sum (after convs) or a channel cat."""
    tree = _sum_tree(heads)
    if tree is not None:
        return _Towers(x, steps, "sum", tree[0], tree[1]) if called_conv(heads[0], modules) is not None else None
    cat = _cat_join(heads)
    if cat is not None:
        order = [heads.index(h) for h in cat[1]]
        return _Towers(x, [[step[i] for i in order] for step in steps], "cat", cat[0], [])
    return None


def merge_towers(gm: fx.GraphModule, report: Report) -> PassResult:
    """Merge every set of parallel towers on one input; ``changed``: how many sets were merged (the new nodes
    have no recorded shapes yet, so shapes go stale)."""
    modules = dict(gm.named_modules())
    merged, created = 0, []
    for x in list(gm.graph.nodes):
        groups: dict[tuple[Any, ...] | None, list[fx.Node]] = {}
        for user in x.users:
            if user.args and user.args[0] is x and called_conv(user, modules) is not None:
                groups.setdefault(_signature(user, modules), []).append(user)
        for first in groups.values():
            if len(first) < 2:
                continue
            towers = _find(x, first, modules)
            if towers is None:
                continue
            try:
                created += _rewrite(gm, towers, modules)
            except A.Refusal as r:
                report.refuse(str(first[0].target), f"parallel paths kept: {r}")
                continue
            modules = dict(gm.named_modules())
            report.rewrites.append(
                Rewrite(
                    _where(first),
                    f"{len(first)} parallel paths of {len(towers.steps)} ops",
                    f"one path ({towers.join} join)",
                    ("merge_towers",),
                )
            )
            merged += 1
    if merged:
        finish(gm)
    return PassResult(merged, tuple(created), shapes_stale=merged > 0)


def _where(first: list[fx.Node]) -> str:
    return str(first[0].target).rsplit(".", 2)[0]


def _merged(step: int, convs: list[nn.modules.conv._ConvNd], towers: _Towers) -> A.Affine:
    """One conv for the convs of a step: outputs stacked (first step), summed over inputs (last step of a sum),
    block-diagonal (the steps between)."""
    affs = [conv_affine(m) for m in convs]
    if step == 0:
        return A.concat(affs)
    if step == len(towers.steps) - 1 and towers.join == "sum":
        return A.sum_over_inputs(affs)
    return reduce(A.direct_sum, affs)


def _reading(node: fx.Node, source: fx.Node) -> Callable[[fx.Node], fx.Node]:
    """``graph.node_copy``'s argument map for a copy of ``node`` that reads ``source`` instead of its input."""
    first = node.args[0]
    return lambda n: source if n is first else n


def _rewrite(gm: fx.GraphModule, towers: _Towers, modules: dict[str, nn.Module]) -> list[str]:
    """Replace the towers by one path; returns the names of the modules it registers.  Every merged module is
    built (or refused) before the graph changes."""
    graph, device = gm.graph, device_of(gm)
    merged: list[nn.Module | None] = []
    for i, nodes in enumerate(towers.steps):
        convs = [c for c in (called_conv(n, modules) for n in nodes) if c is not None]
        merged.append(module_for(_merged(i, convs, towers), torch.float64, device) if convs else None)
    names = []
    current = towers.x
    for nodes, module in zip(towers.steps, merged, strict=True):
        with graph.inserting_before(towers.join_node):
            if module is None:
                current = graph.node_copy(nodes[0], _reading(nodes[0], current))
            else:
                name = f"{nodes[0].target}_towers"
                gm.add_submodule(name, module)
                names.append(name)
                current = graph.call_module(name, (current,))
    with graph.inserting_before(towers.join_node):
        for extra in towers.extras:
            current = graph.call_function(operator.add, (current, extra))
    same_origin(current, towers.join_node)
    towers.join_node.replace_all_uses_with(current)
    return names
